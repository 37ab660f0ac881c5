"""The JSON objects of OpenAI's completions and chat completions API, as its clients read them
(``openai`` parses these into its types: every field it requires is here)."""

from __future__ import annotations

from typing import Any

from appliance.coordinator.generation.run import Chunk, Usage


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "onnx-appliance"}


def completion(
    ident: str,
    created: int,
    model: str,
    text: str,
    finish: str | None,
    usage: Usage,
    chat: bool,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    if token_ids is not None:  # asked for with return_token_ids, as vLLM answers it
        choice["token_ids"] = token_ids
    return {
        "id": ident,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage.as_dict(),
    }


def chunk(
    ident: str,
    created: int,
    model: str,
    piece: Chunk,
    chat: bool,
    first: bool,
    token_ids: bool = False,
) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": piece.text} if first else {}
        if not first and (piece.text or piece.finish_reason is None):
            delta["content"] = piece.text
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "finish_reason": piece.finish_reason,
            "logprobs": None,
        }
    else:
        choice = {
            "index": 0,
            "text": piece.text,
            "finish_reason": piece.finish_reason,
            "logprobs": None,
        }
    if token_ids:
        choice["token_ids"] = piece.token_ids
    return {
        "id": ident,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(ident: str, created: int, model: str, usage: Usage, chat: bool) -> dict[str, Any]:
    """The last event with ``stream_options.include_usage``: no choices, the usage."""
    return {
        "id": ident,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage.as_dict(),
    }
