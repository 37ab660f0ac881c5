"""The model routes: metadata, readiness, configuration, statistics, inference."""

from __future__ import annotations

from typing import Any

from appliance.http.openapi.common import (
    BINARY,
    CACHE_CONTROL,
    PREFER,
    _json,
    _ok,
    _op,
    _ref,
    accepted_job,
)
from runtime.codec import HEADER_LENGTH


def _model_paths(prefix: str, path: tuple[str, ...]) -> dict[str, Any]:
    infer_headers = [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "description": "length of the JSON part of a body with binary tensor data",
            "schema": {"type": "integer", "minimum": 0},
        },
        PREFER,
        CACHE_CONTROL,
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
    infer = _op(
        "inference (JSON or binary tensor data; Prefer: respond-async for a job)",
        answer,
        (400, 404, 409, 413, 415, 503, 504),
        path=path,
        headers=infer_headers,
        accepted=accepted_job(),
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
        prefix + "/stats": {
            "get": _op(
                "Triton-style statistics of the model: requests, queue and compute time",
                _ok("statistics", _ref("ModelStatistics")),
                (400, 404),
                role="admin",
                path=path,
            )
        },
        prefix + "/infer": {"post": infer},
    }
