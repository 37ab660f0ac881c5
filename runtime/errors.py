"""Typed errors of the runtime package.

Each error says what was wrong and what is accepted; the HTTP layer maps the classes to status
codes in one place (``appliance.http.errors``), so nothing here knows about HTTP.
"""

from __future__ import annotations


class RuntimeFailure(Exception):
    """Base of every error raised by ``runtime``."""


class InvalidRequest(RuntimeFailure):
    """The request is malformed or does not fit the model (maps to 400)."""


class CodecError(InvalidRequest):
    """A v2 request body (JSON or binary) could not be decoded."""


class TooManyElements(InvalidRequest):
    """A tensor larger than the server's max_tensor_elements (maps to 413)."""


class UnsupportedDatatype(InvalidRequest):
    """A datatype the v2 protocol or the model does not support."""


class InputMismatch(InvalidRequest):
    """Inputs do not match the model signature (name, datatype, rank or fixed dim)."""


class ShapeMismatch(InputMismatch):
    """A tensor's shape breaks the model's signature or its own data length."""


class ModelNotFound(RuntimeFailure):
    """No such model or version is loaded (maps to 404)."""


class VersionConflict(RuntimeFailure):
    """The bytes asked for (digest) differ from the bytes held (maps to 409)."""


class ModelNotReady(RuntimeFailure):
    """The model exists but is not loaded or warmed yet (maps to 503)."""


class Overloaded(RuntimeFailure):
    """A queue is full; the caller should retry later (maps to 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(RuntimeFailure):
    """The request's timeout passed before it could run (maps to 504)."""


class DeviceUnavailable(RuntimeFailure):
    """The device asked for (e.g. CUDA) was not obtained by onnxruntime."""


class ModelLoadError(RuntimeFailure):
    """A model package could not be read, checked, loaded or warmed."""


# --- text generation: sampling, the node's KV budget, the coordinator's text side ---


class InvalidSamplingParams(InvalidRequest):
    """A sampling parameter (temperature, top_k, top_p, seed) of the wrong type or range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class NonFiniteLogits(RuntimeFailure):
    """The model produced NaN or +inf logits, or masked every token: nothing can be sampled."""


class KvBudgetExhausted(Overloaded):
    """The node's KV memory is held by live sequences now; retry after some finish (503)."""


class SequenceQueueFull(Overloaded):
    """A span's sequences and queue of waiting opens are full, or an open waited too long (503)."""


class KvReservationTooLarge(InvalidRequest):
    """A sequence asks more KV memory than the node's whole capacity: it can never fit."""


class UnknownSequence(InvalidRequest):
    """A step names a sequence the node holds no KV reservation for (released or expired)."""


class UnexpectedPosition(InvalidRequest):
    """A step at another position than the sequence's KV has reached (a replay, a lost step)."""


class SequenceExists(InvalidRequest):
    """A sequence opened twice on one span."""


class KvReservationExceeded(InvalidRequest):
    """A sequence used more KV bytes than it reserved (prompt + max_tokens)."""


class InvalidMessages(InvalidRequest):
    """Chat messages that are not a list of {role, content} with an accepted role and text."""


class NoChatTemplate(InvalidRequest):
    """Chat asked of a model whose package has no chat template (use a plain prompt)."""


class ChatTemplateError(InvalidRequest):
    """The chat template refused the conversation (its raise_exception) or failed on it."""


class InvalidStop(InvalidRequest):
    """Stop strings of the wrong type, count or length."""


# --- generation packages: the decoder span a node serves (runtime.decoder) ---


class ContextOverflow(InvalidRequest):
    """A sequence would run past the model's context length (the positions it was trained for)."""


class DecoderStepFailed(RuntimeFailure):
    """onnxruntime failed inside a decoder span's step; the message names the session."""


class InvalidText(InvalidRequest):
    """Text that is not valid Unicode (a lone surrogate), so it cannot be tokenised."""
