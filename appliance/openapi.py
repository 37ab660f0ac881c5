"""The OpenAPI document of the coordinator's public API.

docs/openapi.yaml is generated from it (``python -m appliance.openapi > docs/openapi.yaml``); a
test keeps the file current and in step with the routes the server really has, and another one
fuzzes a live coordinator with schemathesis against it, so the statuses, headers and bodies
declared here are the ones the handlers and ``http_errors`` really answer.
"""

from __future__ import annotations

import sys
from typing import Any

from runtime.datatypes import V2_TO_NUMPY

JSON = "application/json"
BINARY = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"

_WHY = {
    400: "a malformed request: bad JSON, tensors that do not match the model, bad headers",
    401: "no valid bearer token (auth on); carries WWW-Authenticate",
    403: "a valid token without the admin role this path needs",
    404: "no such model, version, job or route",
    409: "a node holds other bytes of the model than the placement names (a version change)",
    413: "the body is over max_body_bytes, before or after decompression",
    415: "a Content-Encoding other than gzip, deflate or identity",
    429: "this client has max_concurrent_per_client requests in flight already",
    503: "not placed, no live replica, overloaded or a load that timed out; carries Retry-After",
    504: "the request's deadline (its timeout parameter, else request_timeout_s) passed",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


def _path(*names: str) -> list[dict[str, Any]]:
    return [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for n in names
    ]


def _op(
    summary: str,
    ok: dict[str, Any],
    errors: tuple[int, ...],
    *,
    role: str = "infer",
    path: tuple[str, ...] = (),
    headers: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    accepted: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One operation; ``role`` adds the auth answers (none for open paths, 403 for admin ones)
    and 429 from the per-client limit (every path but health)."""
    extra: tuple[int, ...] = {"health": (), "open": (), "infer": (401,), "admin": (401, 403)}[role]
    if role != "health":
        extra += (429,)
    op: dict[str, Any] = {"summary": summary}
    if role in ("open", "health"):
        op["security"] = []
    if path or headers:
        op["parameters"] = [*_path(*path), *(headers or [])]
    if body is not None:
        op["requestBody"] = body
    op["responses"] = {
        "200": ok,
        **({"202": accepted} if accepted else {}),
        **_errors(*sorted({*errors, *extra})),
    }
    return op


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": _json(schema)}


def _obj(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


_STR = {"type": "string"}
_OPTIONAL_JSON = {
    "required": False,
    "description": "empty, or a JSON object",
}


def _model_paths(prefix: str, path: tuple[str, ...]) -> dict[str, Any]:
    infer_headers = [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "description": "length of the JSON part of a body with binary tensor data",
            "schema": {"type": "integer", "minimum": 0},
        },
        {
            "name": "Prefer",
            "in": "header",
            "description": "respond-async: answer 202 with a job (RFC 7240; other preferences "
            "are ignored, a malformed header is a 400)",
            "schema": {"type": "string", "enum": ["respond-async"]},
        },
        {
            "name": "Cache-Control",
            "in": "header",
            "description": "no-cache: not answered from the result cache; no-store: not kept",
            "schema": {"type": "string", "enum": ["no-cache", "no-store", "no-cache, no-store"]},
        },
        {
            "name": "Content-Encoding",
            "in": "header",
            "schema": {"type": "string", "enum": ["gzip", "deflate", "identity"]},
        },
    ]
    answer = {
        "description": "the answer; binary outputs make it a JSON header then raw tensors",
        "headers": {
            "X-Appliance-Cache": {
                "description": "where the answer came from",
                "required": True,
                "schema": {"type": "string", "enum": ["hit", "miss", "bypass"]},
            },
            HEADER_LENGTH: {
                "description": "length of the JSON part (binary answers only)",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            },
        },
        "content": {
            **_json(_ref("InferResponse")),
            BINARY: {"schema": {"type": "string", "format": "binary"}},
        },
    }
    accepted = {
        "description": "Prefer: respond-async: the job is durably queued",
        "headers": {
            "Location": {
                "required": True,
                "schema": {"type": "string", "pattern": "^/v2/jobs/[0-9a-f]+$"},
            },
            "Preference-Applied": {"required": True, "schema": {"type": "string"}},
        },
        "content": _json(_ref("Job")),
    }
    infer = _op(
        "inference (JSON or binary tensor data; Prefer: respond-async for a job)",
        answer,
        (400, 404, 409, 413, 415, 503, 504),
        path=path,
        headers=infer_headers,
        accepted=accepted,
        body={
            "required": True,
            "content": {
                **_json(_ref("InferRequest")),
                BINARY: {"schema": {"type": "string", "format": "binary"}},
            },
        },
    )
    return {
        prefix: {
            "get": _op(
                "model metadata", _ok("metadata", _ref("ModelMetadata")), (400, 404), path=path
            )
        },
        prefix + "/ready": {
            "get": _op(
                "model ready (placed, every span with a live replica)",
                _ok("ready", _ref("ModelReady")),
                (400, 404, 503),
                path=path,
            )
        },
        prefix + "/config": {
            "get": _op(
                "model configuration and placement",
                _ok("configuration", _ref("ModelConfig")),
                (400, 404),
                path=path,
            )
        },
        prefix + "/infer": {"post": infer},
    }


def _schemas() -> dict[str, Any]:
    tensor_meta = _obj(
        ["name", "datatype", "shape"],
        name=_STR,
        datatype=_STR,
        shape={"type": "array", "items": {"type": "integer", "minimum": -1}},
    )
    datatypes = sorted(V2_TO_NUMPY)
    output_tensor = _obj(
        ["name", "datatype", "shape"],
        name=_STR,
        datatype={"type": "string", "enum": datatypes},
        shape={"type": "array", "items": {"type": "integer", "minimum": 0}},
        data={"type": "array"},
        parameters={"type": "object"},
    )
    return {
        "Error": _obj(["error"], error=_STR),
        "ServerMetadata": _obj(
            ["name", "version", "extensions"],
            name=_STR,
            version=_STR,
            extensions={"type": "array", "items": _STR},
        ),
        "Live": _obj(["live"], live={"type": "boolean", "enum": [True]}),
        "Ready": _obj(["ready"], ready={"type": "boolean"}, error=_STR),
        "TensorMetadata": tensor_meta,
        "ModelMetadata": _obj(
            ["name", "versions", "platform", "inputs", "outputs"],
            name=_STR,
            versions={"type": "array", "items": _STR},
            platform=_STR,
            inputs={"type": "array", "items": _ref("TensorMetadata")},
            outputs={"type": "array", "items": _ref("TensorMetadata")},
            parameters={"type": "object"},
        ),
        "ModelReady": _obj(
            ["name", "version", "ready"], name=_STR, version=_STR, ready={"type": "boolean"}
        ),
        "ModelConfig": _obj(
            ["name", "platform", "input", "output"],
            name=_STR,
            platform=_STR,
            backend=_STR,
            input={"type": "array", "items": _ref("TensorMetadata")},
            output={"type": "array", "items": _ref("TensorMetadata")},
            parameters={"type": "object"},
            placement={"type": "object", "nullable": True},
        ),
        "InferInput": _obj(
            ["name", "shape", "datatype"],
            name=_STR,
            shape={"type": "array", "maxItems": 64, "items": {"type": "integer", "minimum": 0}},
            datatype={"type": "string", "enum": datatypes},
            data={
                "type": "array",
                "description": "row-major values, flat or nested (absent for binary data)",
            },
            parameters={
                "type": "object",
                "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
            },
        ),
        "InferRequest": {
            **_obj(
                ["inputs"],
                id=_STR,
                parameters={
                    "type": "object",
                    "properties": {
                        "binary_data_output": {"type": "boolean"},
                        "timeout": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "deadline in microseconds (504 once it passes)",
                        },
                    },
                },
                inputs={"type": "array", "minItems": 1, "items": _ref("InferInput")},
                outputs={
                    "type": "array",
                    "items": _obj(
                        ["name"],
                        name=_STR,
                        parameters={
                            "type": "object",
                            "properties": {"binary_data": {"type": "boolean"}},
                        },
                    ),
                },
            ),
        },
        "InferResponse": _obj(
            ["model_name", "outputs"],
            model_name=_STR,
            model_version=_STR,
            id=_STR,
            parameters={"type": "object"},
            outputs={"type": "array", "items": output_tensor},
        ),
        "Job": _obj(
            ["id", "model", "status", "created", "finished"],
            id=_STR,
            model=_STR,
            status={
                "type": "string",
                "enum": ["queued", "running", "succeeded", "failed", "cancelled"],
            },
            created={"type": "number"},
            finished={"type": "number", "nullable": True},
            error=_STR,
            result=_ref("InferResponse"),
        ),
        "RepositoryIndex": {
            "type": "array",
            "items": _obj(
                ["name", "version", "state", "reason"],
                name=_STR,
                version=_STR,
                state={"type": "string", "enum": ["READY", "UNAVAILABLE"]},
                reason=_STR,
            ),
        },
        "Cluster": _obj(
            ["nodes", "placements", "models"],
            nodes={"type": "array", "items": {"type": "object"}},
            placements={"type": "object"},
            models={"type": "object", "additionalProperties": _STR},
        ),
    }


def _responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, why in _WHY.items():
        response: dict[str, Any] = {"description": why, "content": _json(_ref("Error"))}
        if status in (429, 503):
            response["headers"] = _RETRY_AFTER
        if status == 401:
            response["headers"] = {
                "WWW-Authenticate": {"required": True, "schema": {"type": "string"}}
            }
        responses[f"E{status}"] = response
    return responses


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
                (400, 404, 413, 503),
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
                    "description": "the answer",
                    "headers": {
                        HEADER_LENGTH: {"schema": {"type": "string", "pattern": "^[0-9]+$"}}
                    },
                    "content": {
                        **_json(_ref("InferResponse")),
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
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": _responses(),
            "schemas": _schemas(),
        },
    }


def openapi_yaml() -> str:
    import yaml  # only to write the document (dev extra), not to serve

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True  # shared dicts written out in full, no &id001 anchors

    return str(yaml.dump(openapi_document(), Dumper=Dumper, sort_keys=False, width=100))


if __name__ == "__main__":
    sys.stdout.write(openapi_yaml())
