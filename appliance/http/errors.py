"""The one place where typed errors become HTTP statuses and ``{"error": "..."}`` bodies."""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from appliance.errors import (
    BadRequest,
    BodyTooLarge,
    ConfigError,
    DigestMismatch,
    DoesNotFit,
    Forbidden,
    MemberConflict,
    NoLiveReplica,
    NotMember,
    PlacementError,
    SequenceLost,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
    UpstreamError,
)
from appliance.http.limits import BodyTooSlow
from cache.errors import JobNotFound
from runtime.errors import (
    DeadlineExceeded,
    DeviceUnavailable,
    InvalidRequest,
    KvReservationTooLarge,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    TooManyElements,
    UnexpectedPosition,
    UnknownSequence,
    VersionConflict,
)

log = logging.getLogger(__name__)

# Order matters: the first class an error is an instance of decides its status.
STATUS_OF: list[tuple[type[Exception], int]] = [
    (BodyTooSlow, 408),  # a TimeoutError: before anything that might match that
    (BodyTooLarge, 413),
    (TooManyElements, 413),
    (Unauthorized, 401),
    (Forbidden, 403),
    (TooManyRequests, 429),
    (UnsupportedMediaType, 415),
    (DoesNotFit, 507),  # before PlacementError, its base
    (KvReservationTooLarge, 507),  # before InvalidRequest: it can never fit, not bad input
    (UnknownSequence, 410),  # a step for a sequence this node does not hold (any more)
    (UnexpectedPosition, 409),  # a step at another position than its KV has reached
    (BadRequest, 400),
    (PlacementError, 400),
    (ConfigError, 400),
    (InvalidRequest, 400),
    (ModelLoadError, 400),  # as Triton answers a failed repository load
    (ModelNotFound, 404),
    (JobNotFound, 404),
    (NotMember, 404),
    (VersionConflict, 409),
    (DigestMismatch, 409),
    (MemberConflict, 409),
    (Overloaded, 503),
    (NoLiveReplica, 503),
    (ModelNotReady, 503),
    (DeviceUnavailable, 503),
    (SequenceLost, 503),
    (DeadlineExceeded, 504),
]


def status_of(exc: Exception) -> int | None:
    if isinstance(exc, UpstreamError):
        return exc.status  # a node's final answer travels back as it was
    for cls, status in STATUS_OF:
        if isinstance(exc, cls):
            return status
    return None


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
                 429: "rate_limit_error"}  # fmt: skip


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, object]:
    """An error in OpenAI's shape, as its clients read it on /v1 routes."""
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": str(status)}}


def error_response(
    status: int,
    message: str,
    retry_after_s: float | None = None,
    openai: bool = False,
    param: str | None = None,
) -> web.Response:
    body = openai_error(status, message, param) if openai else {"error": message}
    response = web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
    )
    if retry_after_s is not None:
        response.headers["Retry-After"] = str(max(1, round(retry_after_s)))
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (unknown route, wrong method, body over client_max_size).
        message = exc.text or exc.reason
        if exc.status == 404:
            message = f"no route {request.method} {request.path}; see GET /v2 and docs/api.md"
        elif exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        response = error_response(exc.status, message, openai=_openai(request))
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:
        status = status_of(exc)
        if status is None:
            log.exception("bug while serving %s %s", request.method, request.path)
            message = f"internal error: {type(exc).__name__}: {exc}"
            return error_response(500, message, openai=_openai(request))
        retry = getattr(exc, "retry_after_s", 1.0) if status in (429, 503) else None
        param = getattr(exc, "param", None) or getattr(exc, "field", None)
        response = error_response(status, str(exc), retry, _openai(request), param)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="onnx-appliance"'
        return response


def _openai(request: web.Request) -> bool:
    return request.path.startswith("/v1/")
