"""503 for an inference request over the admission limit, answered from the bytes it came in.

Measured on the development machines (2 cores): aiohttp spends about 200 us of CPU on any
request, refused or not, so at twice the coordinator's capacity refusing the excess through
the middleware stack took half a core, and the loop lagged for it (503s with p99 of 150-300
ms). While admission refuses (``over_limit``), a request that arrived whole in one read (a
keep-alive HTTP/1.1 POST to an inference route, ``Content-Length`` body included, nothing
else in the bytes) is answered here, before aiohttp parses it: the same 503 + Retry-After +
X-Request-Id and JSON error the error table would give, and the same access-log line. The
connection stays open for the next request. Anything else (chunked, Expect, Connection:
close, HTTP/1.0, pipelined bytes, a body still to come) goes to aiohttp as always.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import orjson

from appliance.http.admission import Admission, governed
from appliance.http.logs import REQUEST_ID_HEADER, SAFE_REQUEST_ID

_HEAD_END = b"\r\n\r\n"
# header names are matched at the start of a line ("\r\n" + name): Content-Length is also the
# tail of Inference-Header-Content-Length
_FALLBACK_HEADERS = (b"\r\ntransfer-encoding:", b"\r\nexpect:", b"\r\nupgrade:")
_MESSAGE = "this server is overloaded; retry later"


class FastRefusal:
    def __init__(self, admission: Admission, access: Callable[[], logging.Logger | None]) -> None:
        self.admission = admission
        self._access = access  # the access logger, when the server keeps one
        self.answered = 0
        body = orjson.dumps({"error": _MESSAGE})
        self._head = (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8"
            b"\r\nRetry-After: 1\r\nContent-Length: %d\r\n" % len(body)
        )
        self._body = body

    def try_refuse(self, data: bytes, write: Callable[[bytes], None], remote: str) -> bool:
        """Answer ``data`` (one whole request) with 503 if admission refuses it now."""
        admission = self.admission
        if not admission.enabled or admission.in_flight < admission.limit:
            return False
        if not data.startswith(b"POST /"):
            return False
        end = data.find(_HEAD_END)
        if end < 0:
            return False
        line_end = data.find(b"\r\n")
        request_line = data[:line_end].split(b" ")
        if len(request_line) != 3 or request_line[2] != b"HTTP/1.1":
            return False
        target = request_line[1].decode("latin-1")
        path = target.split("?", 1)[0]
        if not governed("POST", path):
            return False
        head = data[line_end:end].lower()  # from the request line's CRLF: every line starts so
        if any(name in head for name in _FALLBACK_HEADERS) or not _keeps_alive(head):
            return False
        length = _content_length(head)
        if length is None or len(data) != end + 4 + length:
            return False  # a body still to come, or pipelined bytes: aiohttp's to read
        started = time.perf_counter()
        request_id = _request_id(data[line_end:end])
        write(
            self._head + b"%s: %s\r\n\r\n" % (REQUEST_ID_HEADER.encode(), request_id) + self._body
        )
        admission.refused += 1
        self.answered += 1
        access = self._access()
        if access is not None:
            access.info(
                '%s "%s %s" %d %d %.2fms',
                remote,
                "POST",
                path,
                503,
                len(self._body),
                (time.perf_counter() - started) * 1000,
                extra={"request_id": request_id.decode()},
            )
        return True


def _keeps_alive(head: bytes) -> bool:
    """HTTP/1.1 keeps the connection unless a Connection header says close (or upgrade)."""
    at = head.find(b"\r\nconnection:")
    if at < 0:
        return True
    stop = head.find(b"\r\n", at + 2)
    value = head[at + 13 : stop if stop >= 0 else len(head)]
    return b"close" not in value and b"upgrade" not in value


def _content_length(head: bytes) -> int | None:
    at = head.find(b"\r\ncontent-length:")
    if at < 0 or head.count(b"\r\ncontent-length:") != 1:
        return None
    stop = head.find(b"\r\n", at + 2)
    try:
        length = int(head[at + 17 : stop if stop >= 0 else len(head)].strip())
    except ValueError:
        return None
    return length if length >= 0 else None


def _request_id(head: bytes) -> bytes:
    """The client's X-Request-Id when it is a safe token (as request_id_middleware takes it)."""
    at = head.lower().find(b"\r\nx-request-id:")
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        offered = head[at + 15 : stop if stop >= 0 else len(head)].strip().decode("latin-1")
        if SAFE_REQUEST_ID.fullmatch(offered):
            return offered.encode()
    return os.urandom(8).hex().encode()
