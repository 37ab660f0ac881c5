"""The OpenAPI document of the public API, built by route group."""

from appliance.http.openapi.document import openapi_document, openapi_yaml

__all__ = ["openapi_document", "openapi_yaml"]
