"""Logging, configured once per process: text by default, JSON lines on request.

Every line logged while a request is handled carries its id (``X-Request-Id`` if the client sent
one, else one made here and returned in the answer's header), through a context variable that a
logging filter copies onto each record.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import time

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from appliance.http import log_limits

REQUEST_ID_HEADER = "X-Request-Id"
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id.get()
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} [request {request_id}]" if request_id else line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(
    level: str = "info", fmt: str = "text", repeat_interval_s: float = 10.0
) -> None:
    """One handler on stderr; repeated lines rate-limited (``log_limits``; the process runner
    sets the interval from ``log_repeat_interval_s``)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RequestIdFilter())
    log_limits.install(handler, repeat_interval_s)
    # what no formatter here prints, not computed for every record (the logging HOWTO's
    # "Optimization"): under load the access log is a line per request
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request an id for every log line and every hop it causes: the client's
    X-Request-Id when it is a short token (it travels on as a header), else a new one."""
    offered = request.headers.get(REQUEST_ID_HEADER, "")
    # 16 hex digits, as uuid4().hex[:16] gave, without building a UUID on every request
    request_id = offered if SAFE_REQUEST_ID.fullmatch(offered) else os.urandom(8).hex()
    token = current_request_id.set(request_id)
    try:
        response = await handler(request)
    finally:
        current_request_id.reset(token)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, bytes, milliseconds, request id."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path == "/internal/heartbeat" and response.status == 200:
            return  # one per node per second: noise, not traffic
        self.logger.info(
            '%s "%s %s" %d %d %.2fms',
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time * 1000,
            extra={
                "request_id": response.headers.get(REQUEST_ID_HEADER),
                # a body that never came whole: one line per interval says how many (any path)
                **({"repeat_key": "408"} if response.status == 408 else {}),
            },
        )
