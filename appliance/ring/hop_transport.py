"""A lean keep-alive HTTP/1.1 client for hops between ring members.

Hops are the one call made per request per span, so their client cost is paid on every row
that crosses the ring. aiohttp's ClientSession cost about 145 us of CPU per call on loopback
where a pooled connection written once and read by Content-Length cost about 60 us (client and
server together, bench: ``python -m bench.profile``). This client does only what a hop needs:
POST a body to a member with the headers given, read the status, headers and body (by
Content-Length, or chunked), keep the connection for the next hop. TLS (and mutual TLS) go
through asyncio's own SSL transport with the same context aiohttp would use.

A pooled connection the peer has since closed is retried once on a fresh one (the request never
reached the peer); every other failure is raised as ``HopTransportError`` or ``TimeoutError``
for the caller's failover to handle.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from appliance.config import ServerConfig
from appliance.security.signing import HEADER_SIGNATURE, Signer

MAX_HEAD = 64 * 1024


class HopTransportError(ConnectionError):
    """The member could not be reached, or broke the connection or the protocol."""


@dataclass
class HopAnswer:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


@dataclass
class HopTransport:
    tls: ssl.SSLContext | None = None
    max_idle_per_peer: int = 64
    _idle: dict[tuple[str, int, bool], list[_Connection]] = field(
        default_factory=lambda: defaultdict(list)
    )

    async def post(
        self, url: str, headers: dict[str, str], body: bytes, timeout: float
    ) -> HopAnswer:
        """POST ``body`` to ``url`` (scheme, host, port and path) within ``timeout`` seconds."""
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        if secure and self.tls is None:
            raise HopTransportError(f"{url} is https but this process has no TLS client context")
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if secure else 80)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        peer = (host, port, secure)
        async with asyncio.timeout(timeout):
            while True:
                conn = await self._acquire(peer)
                try:
                    answer = await _exchange(conn, request)
                except _StaleConnection:
                    conn.close()
                    continue  # a kept connection the peer had closed: once more on a new one
                except BaseException:
                    conn.close()  # mid-exchange (timeout, cancel, reset): its state is unknown
                    raise
                if answer.headers.get("connection", "").lower() == "close":
                    conn.close()
                else:
                    self._release(peer, conn)
                return answer

    async def _acquire(self, peer: tuple[str, int, bool]) -> _Connection:
        idle = self._idle[peer]
        while idle:
            conn = idle.pop()
            if conn.usable():
                conn.reused = True
                return conn
            conn.close()
        host, port, secure = peer
        try:
            reader, writer = await asyncio.open_connection(
                host, port, ssl=self.tls if secure else None, limit=MAX_HEAD
            )
        except OSError as exc:
            raise HopTransportError(f"cannot connect to {host}:{port}: {exc}") from exc
        return _Connection(reader, writer)

    def _release(self, peer: tuple[str, int, bool], conn: _Connection) -> None:
        idle = self._idle[peer]
        if len(idle) < self.max_idle_per_peer and conn.usable():
            idle.append(conn)
        else:
            conn.close()

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


class _StaleConnection(Exception):
    """A reused connection failed before any byte of the answer: the peer had closed it."""


async def _exchange(conn: _Connection, request: bytes) -> HopAnswer:
    try:
        conn.writer.write(request)
        await conn.writer.drain()
        head = await conn.reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if conn.reused and not exc.partial:
            raise _StaleConnection() from exc
        raise HopTransportError("the peer closed the connection without answering") from exc
    except (ConnectionError, OSError) as exc:
        if conn.reused:  # hops are pure functions of their body: sending again is safe
            raise _StaleConnection() from exc
        raise HopTransportError(f"connection failed: {exc}") from exc
    except asyncio.LimitOverrunError as exc:
        raise HopTransportError("the answer's head is over 64 KiB") from exc
    status_line, _, rest = head.partition(b"\r\n")
    try:
        status = int(status_line.split(b" ", 2)[1])
        headers = _parse_headers(rest)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(conn.reader)
        else:
            body = await conn.reader.readexactly(int(headers.get("content-length", "0")))
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
        raise HopTransportError(f"the answer was cut off: {exc}") from exc
    except (ValueError, IndexError) as exc:
        raise HopTransportError(f"the answer is not HTTP/1.1: {status_line[:80]!r}") from exc
    return HopAnswer(status, headers, body)


def _parse_headers(head: bytes) -> dict[str, str]:
    headers = {}
    for line in head.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readline()).split(b";", 1)[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are sent to hops
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


HopPost = Callable[[str, dict[str, str], bytes, float], Awaitable[HopAnswer]]


def signed(post: HopPost, signer: Signer | None, fixed: dict[str, str]) -> HopPost:
    """``post`` with this process's fixed internal headers (a cluster token) and, when cluster
    secrets are configured, the signature over each call."""

    async def send(url: str, headers: dict[str, str], body: bytes, timeout: float) -> HopAnswer:
        headers = {**fixed, **headers}
        if signer is not None:
            path = url[url.index("/", url.index("//") + 2) :]
            headers[HEADER_SIGNATURE] = signer.header("POST", path, headers, body)
        return await post(url, headers, body, timeout)

    return send


def aiohttp_post(session: aiohttp.ClientSession) -> HopPost:
    """The same call through aiohttp (the session signs and adds its own headers): the design
    before the lean client, kept to measure against (``lean_hops = false``)."""

    async def send(url: str, headers: dict[str, str], body: bytes, timeout: float) -> HopAnswer:
        async with session.post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            payload = await response.read()
            found = {k.lower(): v for k, v in response.headers.items()}
            return HopAnswer(response.status, found, payload)

    return send


class _LeanPost:
    """The lean transport's post, signed; closable at shutdown."""

    def __init__(self, transport: HopTransport, post: HopPost) -> None:
        self.transport = transport
        self._post = post

    async def __call__(
        self, url: str, headers: dict[str, str], body: bytes, timeout: float
    ) -> HopAnswer:
        return await self._post(url, headers, body, timeout)


def hop_post(
    config: ServerConfig,
    session: aiohttp.ClientSession,
    signer: Signer | None,
    tls: ssl.SSLContext | bool,
) -> HopPost:
    """How this process sends hops, from its config (``lean_hops``, ``cluster_token``);
    ``tls`` as for aiohttp: a context, or True for the system's trust store."""
    if not config.lean_hops:
        return aiohttp_post(session)
    context = tls if isinstance(tls, ssl.SSLContext) else ssl.create_default_context()
    transport = HopTransport(context)
    fixed = {"Authorization": f"Bearer {config.cluster_token}"} if config.cluster_token else {}
    return _LeanPost(transport, signed(transport.post, signer, fixed))


async def close_hop_post(post: HopPost) -> None:
    if isinstance(post, _LeanPost):
        await post.transport.close()
