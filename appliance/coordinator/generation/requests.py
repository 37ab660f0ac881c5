"""Generation requests as local apps send them, checked: OpenAI's completions and chat
completions, and Triton's generate extension. Pure functions over the parsed JSON body.

Every field is validated (a wrong type, a negative or too large ``max_tokens`` is a 400 naming
the field); a field that asks for something this server does not do (``n`` > 1, tools, a logit
bias, penalties, ...) is a 400 saying so, never silently ignored.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import BadRequest
from runtime.errors import InvalidSamplingParams
from runtime.sampling import MAX_SEED, SamplingParams, sampling_params
from runtime.text import stop_strings


class InvalidField(BadRequest):
    """A request field of the wrong type or range; ``param`` names it (OpenAI's error field)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    prompt: str | None  # a plain prompt, or None for chat
    messages: list[Any] | None  # chat: checked by the model's chat template
    max_tokens: int | None  # None: until the context or max_tokens_limit ends it
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False  # OpenAI's stream_options.include_usage
    return_token_ids: bool = False  # vLLM's extension: each choice (and chunk) has token_ids


# fields a client may send that change nothing here (identity, metadata), and fields whose
# neutral value is accepted while any other is refused
_IGNORED = {"user", "metadata", "store", "service_tier"}
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1, None),
    "best_of": (1, None),
    "echo": (False, None),
    "logprobs": (False, None, 0),
    "top_logprobs": (0, None),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None,),
    "suffix": (None, ""),
    "tools": (None,),
    "tool_choice": (None, "none"),
    "functions": (None,),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None,),
    "modalities": (None,),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
}
_SAMPLING = ("temperature", "top_p", "top_k", "seed")


def _unsupported(body: Mapping[str, Any], accepted: set[str]) -> None:
    for key, value in body.items():
        if key in accepted or key in _IGNORED:
            continue
        neutral = _NEUTRAL.get(key)
        if neutral is None:
            raise InvalidField(
                key,
                f"{key} is not a field this endpoint takes; accepted: "
                f"{', '.join(sorted(accepted | _IGNORED))}",
            )
        if not any(value is v or (value == v and type(value) is type(v)) for v in neutral):
            if key == "response_format" and value in ({"type": "text"},):
                continue
            raise InvalidField(key, f"{key} = {_show(value)} is not supported by this server")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(body: Mapping[str, Any], key: str, limit: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(key, f"{key} must be an integer, got {_show(value)}")
    if value < 1:
        raise InvalidField(key, f"{key} must be at least 1, got {value}")
    if value > limit:
        raise InvalidField(key, f"{key} = {value} is above this server's limit of {limit} "
                                "(max_tokens_limit)")  # fmt: skip
    return value


def _boolean(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidField(key, f"{key} must be true or false, got {_show(value)}")
    return value


def _sampling(body: Mapping[str, Any], defaults: Mapping[str, Any]) -> SamplingParams:
    """The sampling fields, with the model's defaults; a request without a seed gets a random
    one here, so a replacement node sampling for it would draw the same tokens."""
    try:
        return sampling_params(
            {k: body[k] for k in _SAMPLING if k in body},
            defaults,
            seed_if_absent=secrets.randbelow(MAX_SEED),
        )
    except InvalidSamplingParams as exc:
        raise InvalidField(exc.field, str(exc)) from exc


def _stop(body: Mapping[str, Any]) -> list[str]:
    try:
        return stop_strings(body.get("stop"))
    except BadRequest:
        raise
    except Exception as exc:  # InvalidStop, an InvalidRequest of the runtime
        raise InvalidField("stop", str(exc)) from exc


def _stream_options(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise InvalidField(
            "stream_options", 'stream_options accepts only {"include_usage": true|false}'
        )
    if not body.get("stream"):
        raise InvalidField("stream_options", "stream_options needs stream: true")
    return _boolean(options, "include_usage")


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidField("model", f"model must be the name of a served model, got {_show(model)}")
    return model


_COMMON = {
    "model", "max_tokens", "stream", "stream_options", "stop", "ignore_eos", "return_token_ids",
    *_SAMPLING,
}  # fmt: skip


def completion_request(
    body: Mapping[str, Any], limit: int, defaults: Mapping[str, Any]
) -> GenerationRequest:
    """``POST /v1/completions``: one prompt (a string, or a list holding one string)."""
    _unsupported(body, _COMMON | {"prompt"})
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidField(
            "prompt", f"prompt must be a string (or a list of one string), got {_show(prompt)}"
        )
    return GenerationRequest(
        model=_model(body),
        prompt=prompt,
        messages=None,
        max_tokens=_integer(body, "max_tokens", limit) or 16,  # OpenAI's default
        sampling=_sampling(body, defaults),
        stop=_stop(body),
        ignore_eos=_boolean(body, "ignore_eos"),
        stream=_boolean(body, "stream"),
        include_usage=_stream_options(body),
        return_token_ids=_boolean(body, "return_token_ids"),
    )


def chat_request(
    body: Mapping[str, Any], limit: int, defaults: Mapping[str, Any]
) -> GenerationRequest:
    """``POST /v1/chat/completions``: messages rendered by the model's chat template."""
    _unsupported(body, _COMMON | {"messages", "max_completion_tokens"})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidField("messages", f"messages must be a non-empty list, got {_show(messages)}")
    max_tokens = _integer(body, "max_completion_tokens", limit) or _integer(
        body, "max_tokens", limit
    )
    return GenerationRequest(
        model=_model(body),
        prompt=None,
        messages=messages,
        max_tokens=max_tokens,
        sampling=_sampling(body, defaults),
        stop=_stop(body),
        ignore_eos=_boolean(body, "ignore_eos"),
        stream=_boolean(body, "stream"),
        include_usage=_stream_options(body),
        return_token_ids=_boolean(body, "return_token_ids"),
    )


def triton_request(
    model: str, body: Mapping[str, Any], limit: int, defaults: Mapping[str, Any], stream: bool
) -> GenerationRequest:
    """Triton's generate extension: ``{"text_input": str, "parameters": {...}}``; the sampling
    and length fields may also be top-level, as Triton's own examples send them."""
    text = body.get("text_input")
    if not isinstance(text, str):
        raise InvalidField("text_input", f"text_input must be a string, got {_show(text)}")
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidField("parameters", "parameters must be a JSON object")
    fields = {k: v for k, v in body.items() if k not in ("text_input", "parameters", "id")}
    merged = {**fields, **parameters}
    _unsupported(merged, {"max_tokens", "stop", "ignore_eos", "stream", *_SAMPLING})
    return GenerationRequest(
        model=model,
        prompt=text,
        messages=None,
        max_tokens=_integer(merged, "max_tokens", limit) or 16,
        sampling=_sampling(merged, defaults),
        stop=_stop(merged),
        ignore_eos=_boolean(merged, "ignore_eos"),
        stream=stream,
    )
