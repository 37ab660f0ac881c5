"""The listening socket and its accept loop: aiohttp's TCPSite, with aiohttp's own protocol
for each connection wrapped so the tracker sees it (its opening, bytes in, writes paused and
resumed, its end), a TLS handshake timeout, a deep backlog, and accepting governed by the cap.

The accept loop is this module's rather than asyncio's (``create_server``) because the cap
needs control of *when* to accept, measured under a flood of 3,000 reconnecting clients on 2
cores against a cap of 900: accepting every newcomer and closing it when nothing may be shed
kept the loop busy with connections it refused, and a well-behaved client, just another
newcomer, was refused with them. Here, when the cap is reached and nothing qualifies to be
shed, one newcomer is refused (counted) and accepting pauses for a moment: the others wait in
the kernel's backlog at no cost, in order, and are taken as room appears. A failed accept
(out of descriptors) is counted, logged once per interval, answered by shedding, and retried
after a pause, where asyncio 3.11 would log a traceback per try, up to the backlog per tick.
Each accepted socket goes to ``loop.connect_accepted_socket`` (TLS included).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import struct
import time
from collections import Counter
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from appliance.http.connections import (
    IDLE,
    PARTIAL,
    SILENT,
    ConnectionTracker,
    TrackedConnection,
)
from appliance.http.fast_refusal import FastRefusal

log = logging.getLogger(__name__)

_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_SHED_ON_EMFILE = 32  # descriptors freed at once when an accept fails for want of them
_EMFILE_PAUSE_S = 0.1  # asyncio waits 1 s; shedding made room, so sooner
_FULL_PAUSE_S = 0.05  # at the cap with nothing to shed: the backlog waits this long
_ACCEPTS_PER_TICK = 256  # other callbacks get the loop between batches


class _Tracked(asyncio.Protocol):
    """aiohttp's protocol for one connection, seen by the tracker on the way."""

    __slots__ = ("_inner", "_conn", "_tracker", "_made", "_fast")

    def __init__(
        self, inner: RequestHandler, tracker: ConnectionTracker, fast: FastRefusal | None
    ) -> None:
        self._inner = inner
        self._tracker = tracker
        self._fast = fast
        self._conn: TrackedConnection = tracker.opening()
        self._made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._tracker.made(self._conn, transport, self._inner):
            self._made = True
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        conn.bytes_in += len(data)
        if conn.phase == SILENT or conn.phase == IDLE:  # a request begins
            if self._fast is not None and self._refused_here(data):
                return  # overloaded: 503 from these bytes, aiohttp never parses them
            self._tracker.first_byte(conn)
        if conn.phase == PARTIAL and not conn.head_end:
            self._tracker.partial_bytes(conn, data)
        self._inner.data_received(data)

    def _refused_here(self, data: bytes) -> bool:
        conn, fast = self._conn, self._fast
        transport = conn.transport
        if (
            fast is None
            or transport is None
            or not fast.try_refuse(data, transport.write, conn.peer)
        ):
            return False
        self._tracker.answered_here(conn)
        return True

    def eof_received(self) -> bool | None:
        self._inner.eof_received()
        return None  # as aiohttp's: the transport closes itself

    def pause_writing(self) -> None:
        self._tracker.paused(self._conn)
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._tracker.resumed(self._conn)
        self._inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._tracker.lost(self._conn)
        if self._made:
            self._inner.connection_lost(exc)


class AcceptErrors:
    """Failed accepts of the process: counted by errno, logged once per interval with the
    count since, answered by shedding connections."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.counts: Counter[str] = Counter()
        self._logged_at = -float("inf")
        self._unlogged = 0

    def failed(self, exc: OSError, tracker: ConnectionTracker) -> None:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.counts[name] += 1
        tracker.shed(_SHED_ON_EMFILE)
        now = time.monotonic()
        self._unlogged += 1
        if now - self._logged_at >= self.interval_s:
            since = 0.0 if self._logged_at == -float("inf") else now - self._logged_at
            log.error(
                "accept failed %d time(s) in the last %.0f s (%s: %s); shedding connections",
                self._unlogged,
                since,
                name,
                exc.strerror,
            )
            self._logged_at = now
            self._unlogged = 0


ACCEPT_ERRORS = AcceptErrors()  # one per process, as the descriptor limit is


class Listener(asyncio.AbstractServer):
    """Listening sockets whose accepting the tracker governs (what asyncio.Server does for
    ``create_server``, plus pausing at the cap)."""

    def __init__(
        self,
        sockets: list[socket.socket],
        make_protocol: Any,
        tracker: ConnectionTracker,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout_s: float,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.sockets = sockets
        self._make_protocol = make_protocol
        self._tracker = tracker
        self._ssl = ssl_context
        self._handshake_timeout_s = handshake_timeout_s if ssl_context is not None else None
        self._serving = False
        self._paused: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if not self._serving:
            self._serving = True
            self._watch()

    def close(self) -> None:
        if not self.sockets:
            return
        self._unwatch()
        self._serving = False
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    async def serve_forever(self) -> None:
        await self.start_serving()
        await asyncio.Event().wait()  # until cancelled, as asyncio.Server's

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _watch(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _unwatch(self) -> None:
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())

    def _pause(self, seconds: float) -> None:
        if self._paused is None and self._serving:
            self._unwatch()
            self._paused = self._loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self._serving:
            self._watch()

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(_ACCEPTS_PER_TICK):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                try:  # paused whatever shedding does: a reader left on would spin
                    ACCEPT_ERRORS.failed(exc, self._tracker)
                finally:
                    self._pause(_EMFILE_PAUSE_S)
                return
            if self._tracker.full() and not self._tracker.make_room():
                # nothing may make room: this newcomer goes (a reset, counted), the rest of
                # the backlog waits a moment in the kernel instead of being taken and refused
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                self._tracker.refused()
                self._pause(_FULL_PAUSE_S)
                return
            task = self._loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        protocol: _Tracked = self._make_protocol()
        try:
            await self._loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=self._ssl,
                ssl_handshake_timeout=self._handshake_timeout_s,
            )
        except (OSError, ssl.SSLError, EOFError):
            conn.close()  # a handshake that failed or timed out: the tracker counts it
            self._tracker.handshake_failed(protocol._conn)
        except asyncio.CancelledError:
            conn.close()
            raise


def bind(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for host:port, as ``loop.create_server`` makes them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot bind {address!r}: {exc.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class GuardedSite(web.TCPSite):
    """TCPSite whose connections go through the tracker and whose accepting it governs."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        tracker: ConnectionTracker,
        ssl_context: ssl.SSLContext | None,
        backlog: int,
        handshake_timeout_s: float,
        fast: FastRefusal | None = None,
    ) -> None:
        super().__init__(
            runner, host, port, reuse_address=True, ssl_context=ssl_context, backlog=backlog
        )
        self._tracker = tracker
        self._handshake_timeout_s = handshake_timeout_s
        self._fast = fast

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        tracker, fast = self._tracker, self._fast

        def make_protocol() -> _Tracked:
            return _Tracked(server(), tracker, fast)

        listener = Listener(
            bind(self._host or "", self._port, self._backlog),
            make_protocol,
            tracker,
            self._ssl_context,
            self._handshake_timeout_s,
        )
        await listener.start_serving()
        self._server = listener
        self._bound_port = listener.sockets[0].getsockname()[1] if listener.sockets else self._port
