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
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
    UpstreamError,
)
from cache.errors import JobNotFound
from runtime.errors import (
    DeadlineExceeded,
    DeviceUnavailable,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    TooManyElements,
    VersionConflict,
)

log = logging.getLogger(__name__)

# Order matters: the first class an error is an instance of decides its status.
STATUS_OF: list[tuple[type[Exception], int]] = [
    (BodyTooLarge, 413),
    (TooManyElements, 413),
    (Unauthorized, 401),
    (Forbidden, 403),
    (TooManyRequests, 429),
    (UnsupportedMediaType, 415),
    (DoesNotFit, 507),  # before PlacementError, its base
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
    (DeadlineExceeded, 504),
]


def status_of(exc: Exception) -> int | None:
    if isinstance(exc, UpstreamError):
        return exc.status  # a node's final answer travels back as it was
    for cls, status in STATUS_OF:
        if isinstance(exc, cls):
            return status
    return None


def error_response(status: int, message: str, retry_after_s: float | None = None) -> web.Response:
    response = web.Response(
        status=status,
        body=orjson.dumps({"error": message}),
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
        response = error_response(exc.status, message)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:
        status = status_of(exc)
        if status is None:
            log.exception("bug while serving %s %s", request.method, request.path)
            return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        retry = getattr(exc, "retry_after_s", 1.0) if status in (429, 503) else None
        response = error_response(status, str(exc), retry)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="onnx-appliance"'
        return response
