"""The OpenAPI document of the coordinator's public API (docs/openapi.json is generated from it
and a test keeps both in step with the routes the server really has)."""

from __future__ import annotations

import json
from typing import Any

_ERROR = {"$ref": "#/components/responses/Error"}
_JSON = {"application/json": {"schema": {"type": "object"}}}


def _op(
    summary: str,
    ok: str,
    *errors: int,
    body: bool = False,
    binary: bool = False,
    params: list[str] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {ok: {"description": summary, "content": _JSON}}
    for status in errors:
        responses[str(status)] = _ERROR
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in params
        ]
    if body:
        content: dict[str, Any] = {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}
        }
        if binary:
            content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
        op["requestBody"] = {"required": True, "content": content}
    return op


def _model_paths(prefix: str, params: list[str]) -> dict[str, Any]:
    return {
        prefix: {"get": _op("model metadata", "200", 404, params=params)},
        prefix + "/ready": {"get": _op("model ready", "200", 404, 503, params=params)},
        prefix + "/config": {"get": _op("model configuration", "200", 404, params=params)},
        prefix + "/infer": {
            "post": {
                **_op(
                    "inference (JSON or binary tensor data; Prefer: respond-async for a job)",
                    "200",
                    400,
                    404,
                    409,
                    413,
                    503,
                    504,
                    body=True,
                    binary=True,
                    params=params,
                ),
                "parameters": [
                    *[
                        {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                        for p in params
                    ],
                    {
                        "name": "Inference-Header-Content-Length",
                        "in": "header",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                    {"name": "Prefer", "in": "header", "schema": {"type": "string"}},
                    {"name": "Cache-Control", "in": "header", "schema": {"type": "string"}},
                ],
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/": {
            "get": {
                "summary": "status page (HTML)",
                "responses": {"200": {"description": "the page", "content": {"text/html": {}}}},
            }
        },
        "/v2": {"get": _op("server metadata", "200")},
        "/v2/health/live": {"get": _op("liveness", "200")},
        "/v2/health/ready": {"get": _op("readiness", "200", 503)},
        **_model_paths("/v2/models/{model}", ["model"]),
        **_model_paths("/v2/models/{model}/versions/{version}", ["model", "version"]),
        "/v2/repository/index": {"post": _op("models on disk and their state", "200", 400)},
        "/v2/repository/models/{model}/load": {
            "post": _op("place and warm a model", "200", 400, 404, 503, params=["model"])
        },
        "/v2/repository/models/{model}/unload": {
            "post": _op("unload a model", "200", 404, params=["model"])
        },
        "/v2/cluster": {"get": _op("nodes, spans and placements", "200")},
        "/v2/jobs/{job}": {
            "get": _op("a job's state (its result once succeeded)", "200", 404, params=["job"]),
            "delete": _op("cancel a job", "200", 404, params=["job"]),
        },
        "/v2/jobs/{job}/result": {"get": _op("a job's answer", "200", 404, params=["job"])},
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}},
            }
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "onnx-appliance",
            "version": "0.1.0",
            "description": "KServe v2 / Open Inference Protocol over a ring of nodes",
        },
        "paths": paths,
        "components": {
            "responses": {
                "Error": {
                    "description": "an error",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["error"],
                                "properties": {"error": {"type": "string"}},
                            }
                        }
                    },
                }
            },
            "schemas": {
                "InferRequest": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string"},
                                    "parameters": {"type": "object"},
                                    "data": {"type": "array"},
                                },
                            },
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
        },
    }


def openapi_json() -> str:
    return json.dumps(openapi_document(), indent=1) + "\n"
