"""The OpenAPI document of the coordinator's public API.

docs/openapi.yaml is generated from it (``python -m appliance.http.openapi > docs/openapi.yaml``);
a test keeps the file current and in step with the routes the server really has, and another one
fuzzes a live coordinator with schemathesis against it, so the statuses, headers and bodies
declared here are the ones the handlers and ``appliance.http.errors`` really answer.
"""

from __future__ import annotations

from typing import Any

from appliance.http.openapi.common import (
    _OPTIONAL_JSON,
    _RETRY_AFTER,
    _STR,
    BINARY,
    _json,
    _ok,
    _op,
    _ref,
    _responses,
)
from appliance.http.openapi.generation import generation_paths, generation_schemas
from appliance.http.openapi.models import _model_paths
from appliance.http.openapi.schemas import _schemas
from runtime.codec import HEADER_LENGTH


def openapi_document() -> dict[str, Any]:
    empty_ok = {"description": "done (no body)"}
    paths: dict[str, Any] = {
        "/": {
            "get": _op(
                "status page (HTML; it asks for a token itself)",
                {"description": "the page", "content": {"text/html": {"schema": _STR}}},
                (),
                role="open",
            )
        },
        "/v2": {"get": _op("server metadata", _ok("metadata", _ref("ServerMetadata")), ())},
        "/v2/health/live": {"get": _op("liveness", _ok("live", _ref("Live")), (), role="health")},
        "/v2/health/ready": {
            "get": {
                "summary": "readiness: every placed model has a live replica of every span",
                "security": [],
                "responses": {
                    "200": _ok("ready", _ref("Ready")),
                    "503": {
                        "description": "not ready, and why",
                        "headers": _RETRY_AFTER,
                        "content": _json(_ref("Ready")),
                    },
                },
            }
        },
        **_model_paths("/v2/models/{model}", ("model",)),
        **_model_paths("/v2/models/{model}/versions/{version}", ("model", "version")),
        "/v2/repository/index": {
            "post": _op(
                "models on disk and their state",
                _ok("the index", _ref("RepositoryIndex")),
                (400, 413),
                role="admin",
                body={
                    **_OPTIONAL_JSON,
                    "content": _json(
                        {"type": "object", "properties": {"ready": {"type": "boolean"}}}
                    ),
                },
            )
        },
        "/v2/repository/models/{model}/load": {
            "post": _op(
                "place and warm a model (200 once every replica is warm)",
                empty_ok,
                (400, 404, 413, 503, 507),
                role="admin",
                path=("model",),
                body={
                    **_OPTIONAL_JSON,
                    "content": _json(
                        {
                            "type": "object",
                            "properties": {
                                "parameters": {
                                    "type": "object",
                                    "properties": {
                                        "stages": {"type": "integer", "minimum": 1},
                                        "replicas": {"type": "integer", "minimum": 1},
                                    },
                                }
                            },
                        }
                    ),
                },
            )
        },
        "/v2/repository/models/{model}/unload": {
            "post": _op(
                "unload a model (its placement and cached results go)",
                empty_ok,
                (400, 404, 413),
                role="admin",
                path=("model",),
                body={**_OPTIONAL_JSON, "content": _json({"type": "object"})},
            )
        },
        "/v2/models/stats": {
            "get": _op(
                "Triton-style statistics of every model served",
                _ok("statistics", _ref("ModelStatistics")),
                (),
                role="admin",
            )
        },
        "/v2/cluster": {
            "get": _op(
                "nodes, spans and placements", _ok("the ring", _ref("Cluster")), (), role="admin"
            )
        },
        "/v2/jobs/{job}": {
            "get": _op(
                "a job's state (its result once succeeded)",
                _ok("the job", _ref("Job")),
                (404,),
                path=("job",),
            ),
            "delete": _op(
                "cancel a queued or running job; answers its state",
                _ok("the job", _ref("Job")),
                (404,),
                path=("job",),
            ),
        },
        "/v2/jobs/{job}/result": {
            "get": _op(
                "a succeeded job's answer, as the sync call would have sent it",
                {
                    "description": "the answer (of the route the job was submitted to)",
                    "headers": {
                        HEADER_LENGTH: {"schema": {"type": "string", "pattern": "^[0-9]+$"}}
                    },
                    "content": {
                        **_json(
                            {
                                "oneOf": [
                                    _ref("InferResponse"),
                                    _ref("GenerateResponse"),
                                    _ref("Completion"),
                                    _ref("ChatCompletion"),
                                ]
                            }  # fmt: skip
                        ),
                        BINARY: {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                (404,),
                path=("job",),
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics (admin unless metrics_public)",
                {"description": "metrics", "content": {"text/plain": {"schema": _STR}}},
                (),
                role="admin",
            )
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "onnx-appliance",
            "version": "0.1.0",
            "description": "KServe v2 / Open Inference Protocol over a ring of nodes. With "
            "tokens configured, every path but health and the status page needs a bearer "
            "token (admin for the repository, cluster and metrics); with none, auth is off.",
        },
        "security": [{"bearer": []}],
        "paths": {**paths, **generation_paths()},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": _responses(),
            "schemas": {**_schemas(), **generation_schemas()},
        },
    }


def openapi_yaml() -> str:
    import yaml  # only to write the document (dev extra), not to serve

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True  # shared dicts written out in full, no &id001 anchors

    return str(yaml.dump(openapi_document(), Dumper=Dumper, sort_keys=False, width=100))
