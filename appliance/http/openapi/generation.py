"""The generation routes: Triton's generate extension and the OpenAI-compatible API."""

from __future__ import annotations

from typing import Any

from appliance.http.openapi.common import (
    _STR,
    CACHE_CONTROL,
    PREFER,
    _json,
    _obj,
    _ok,
    _op,
    _ref,
    accepted_job,
)

SSE = "text/event-stream"
# one server-sent event as clients (and schemathesis) parse it: the JSON text of a chunk in data
_EVENT = _obj(["data"], data=_STR, event=_STR, id=_STR)
_INT = {"type": "integer"}
_SAMPLING = {
    "temperature": {"type": "number", "minimum": 0, "description": "0: greedy"},
    "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 0, "description": "0: off"},
    "seed": {"type": "integer", "minimum": 0, "description": "the same seed, the same tokens"},
    "max_tokens": {"type": "integer", "minimum": 1, "description": "at most max_tokens_limit"},
    "stop": {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
        ],
        "nullable": True,
    },
    "ignore_eos": {"type": "boolean", "description": "go on past the end-of-sequence token"},
}
# a whole answer may be a durable job instead (not a stream: that is a 400), and greedy ones
# are answered from the result cache
_WHOLE: dict[str, Any] = {"headers": [PREFER, CACHE_CONTROL], "accepted": accepted_job()}
_TOKEN_IDS = {
    "type": "boolean",
    "description": "vLLM's extension: each choice (and streamed chunk) carries its token_ids",
}
_STREAMING = {
    "stream": {"type": "boolean"},
    "stream_options": _obj([], include_usage={"type": "boolean"}),
}


def _streamed(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description + "; with stream: true, server-sent events ending data: [DONE]",
        "content": {**_json(_ref(schema)), SSE: {"schema": _EVENT}},
    }


def generation_paths() -> dict[str, Any]:
    errors = (400, 404, 413, 503, 507)
    triton_body = {
        "required": True,
        "content": _json(
            _obj(
                ["text_input"],
                text_input=_STR,
                parameters={"type": "object", "properties": _SAMPLING},
            )
        ),
    }
    return {
        "/v2/models/{model}/generate": {
            "post": _op(
                "Triton's generate extension: the whole answer",
                _ok("the generated text", _ref("GenerateResponse")),
                errors,
                path=("model",),
                body=triton_body,
                **_WHOLE,
            )
        },
        "/v2/models/{model}/generate_stream": {
            "post": _op(
                "Triton's generate extension, streamed as server-sent events",
                {"description": "one data: event per chunk", "content": {SSE: {"schema": _EVENT}}},
                errors,
                path=("model",),
                body=triton_body,
            )
        },
        "/v1/models": {
            "get": _op(
                "OpenAI-compatible: the generation models served",
                _ok("the models", _ref("ModelList")),
                (),
                errors_as="O",
            )
        },
        "/v1/completions": {
            "post": _op(
                "OpenAI-compatible completions",
                _streamed("the completion", "Completion"),
                errors,
                body={"required": True, "content": _json(_ref("CompletionRequest"))},
                errors_as="O",
                **_WHOLE,
            )
        },
        "/v1/chat/completions": {
            "post": _op(
                "OpenAI-compatible chat completions (the model's chat template)",
                _streamed("the chat completion", "ChatCompletion"),
                errors,
                body={"required": True, "content": _json(_ref("ChatRequest"))},
                errors_as="O",
                **_WHOLE,
            )
        },
    }


def generation_schemas() -> dict[str, Any]:
    usage = _obj(
        ["prompt_tokens", "completion_tokens", "total_tokens"],
        prompt_tokens=_INT,
        completion_tokens=_INT,
        total_tokens=_INT,
        # prompt tokens whose KV the nodes held (prefix reuse), as OpenAI reports cached ones
        prompt_tokens_details=_obj([], cached_tokens=_INT),
    )
    finish = {"type": "string", "enum": ["stop", "length"], "nullable": True}
    message = _obj(
        ["role", "content"],
        role={"type": "string", "enum": ["system", "user", "assistant"]},
        content={"oneOf": [_STR, {"type": "array", "items": {"type": "object"}}]},
    )
    return {
        "OpenAIError": _obj(
            ["error"],
            error=_obj(
                ["message", "type"],
                message=_STR,
                type=_STR,
                param={"type": "string", "nullable": True},
                code={"type": "string", "nullable": True},
            ),
        ),
        "GenerateResponse": _obj(
            ["model_name", "model_version", "text_output"],
            model_name=_STR,
            model_version=_STR,
            text_output=_STR,
        ),
        "ModelList": _obj(
            ["object", "data"],
            object={"type": "string", "enum": ["list"]},
            data={
                "type": "array",
                "items": _obj(["id", "object"], id=_STR, object=_STR, created=_INT, owned_by=_STR),
            },
        ),
        "CompletionRequest": _obj(
            ["model", "prompt"],
            model=_STR,
            prompt={"oneOf": [_STR, {"type": "array", "items": _STR, "maxItems": 1}]},
            return_token_ids=_TOKEN_IDS,
            **_SAMPLING,
            **_STREAMING,
        ),
        "ChatRequest": _obj(
            ["model", "messages"],
            model=_STR,
            messages={"type": "array", "items": message, "minItems": 1},
            max_completion_tokens={"type": "integer", "minimum": 1},
            return_token_ids=_TOKEN_IDS,
            **_SAMPLING,
            **_STREAMING,
        ),
        "Completion": _obj(
            ["id", "object", "created", "model", "choices", "usage"],
            id=_STR,
            object=_STR,
            created=_INT,
            model=_STR,
            choices={
                "type": "array",
                "items": _obj(
                    ["index", "text", "finish_reason"],
                    index=_INT,
                    text=_STR,
                    finish_reason=finish,
                    token_ids={"type": "array", "items": _INT},
                ),
            },  # fmt: skip
            usage=usage,
        ),
        "ChatCompletion": _obj(
            ["id", "object", "created", "model", "choices", "usage"],
            id=_STR,
            object=_STR,
            created=_INT,
            model=_STR,
            choices={
                "type": "array",
                "items": _obj(
                    ["index", "message", "finish_reason"],
                    index=_INT,
                    message=message,
                    finish_reason=finish,
                    token_ids={"type": "array", "items": _INT},
                ),
            },  # fmt: skip
            usage=usage,
        ),
    }
