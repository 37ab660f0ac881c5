"""A node's internal ring calls (hops, sequence open, steps, close) as functions of their
headers and body, so the same code answers them over HTTP and, when a coordinator shares this
node's process (``appliance serve --in-process-node``), as a plain function call.

The HTTP route reads the body (size limit, Content-Encoding) and hands over; the call's answer
is a ``Reply`` that either way becomes the same status, headers and bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from appliance.errors import BadRequest
from appliance.headers import COMPUTE_TIME, SERVER_TIME
from appliance.http.body import read_body
from appliance.http.errors import status_of
from appliance.http.server_time import COMPUTE_SECONDS
from appliance.node.keys import CONFIG
from appliance.ring import protocol as rp
from appliance.ring.hop_transport import HopAnswer
from appliance.ring.local_peers import LocalCall

log = logging.getLogger(__name__)


@dataclass
class NodeCall:
    state: Mapping[Any, Any]  # the node app's state (an aiohttp config_dict or the app)
    headers: CIMultiDictProxy[str]
    body: bytes
    compute_s: float | None = None  # what the span's run took, for the answer's COMPUTE_TIME

    def json_object(self) -> dict[str, Any]:
        try:
            parsed = orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"body must be a JSON object: {exc}") from exc
        if not isinstance(parsed, dict):
            raise BadRequest(f"body must be a JSON object, got {type(parsed).__name__}")
        return parsed


@dataclass(frozen=True)
class Reply:
    body: bytes
    content_type: str = "application/json"
    header_length: int | None = None  # a binary answer's JSON header length

    @classmethod
    def json(cls, payload: Any) -> Reply:
        return cls(orjson.dumps(payload))

    def headers(self) -> dict[str, str]:
        found = {"content-type": self.content_type}
        if self.header_length is not None:
            found[rp.HEADER_LENGTH.lower()] = str(self.header_length)
        return found


Run = Callable[[NodeCall], Awaitable[Reply]]


def http_route(run: Run) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``run`` as an aiohttp handler (errors go on to the app's error middleware)."""

    async def handler(request: web.Request) -> web.Response:
        body = await read_body(request, request.config_dict[CONFIG].max_body_bytes)
        call = NodeCall(request.config_dict, request.headers, body)
        try:
            reply = await run(call)
        finally:
            if call.compute_s is not None:
                request[COMPUTE_SECONDS] = call.compute_s
        response = web.Response(body=reply.body, content_type=reply.content_type)
        if reply.header_length is not None:
            response.headers[rp.HEADER_LENGTH] = str(reply.header_length)
        return response

    handler.__name__ = run.__name__
    return handler


def local_calls(state: Mapping[Any, Any], routes: Mapping[str, Run]) -> LocalCall:
    """The node's ``routes`` (by path, e.g. ``/internal/hop``) for a caller in this process: the
    answer an HTTP call would get (the status from the one error table, ``{"error": ...}``),
    with no socket, parsing, signature or token in between: the caller is this process."""

    async def call(path: str, headers: Mapping[str, str], body: bytes) -> HopAnswer:
        run = routes[path]
        started = time.perf_counter()
        node_call = NodeCall(state, CIMultiDictProxy(CIMultiDict(headers)), body)
        try:
            reply = await run(node_call)
        except Exception as exc:
            status = status_of(exc)
            if status is None:
                log.exception("bug while serving %s %s", "POST", path)
            message = str(exc) if status else f"internal error: {type(exc).__name__}: {exc}"
            error = orjson.dumps({"error": message})
            return HopAnswer(status or 500, {"content-type": "application/json"}, error)
        found = reply.headers()
        found[SERVER_TIME.lower()] = f"{time.perf_counter() - started:.6f}"
        if node_call.compute_s is not None:
            found[COMPUTE_TIME.lower()] = f"{node_call.compute_s:.6f}"
        return HopAnswer(200, found, reply.body)

    return call
