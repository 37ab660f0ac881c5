"""Every inbound connection of a server, from accept to close, and the limits on each phase.

aiohttp ends only a connection that never sent complete headers, and only after an hour; a
stalled body, a client that does not read its answer or a flood of idle sockets are not its
concern. The tracker is: each connection is in one phase (handshake, silent, partial headers,
request, idle) kept in an insertion-ordered dict per phase, updated by the protocol wrapper
(``site.py``: bytes in, writes paused and resumed) and by the outermost middleware (a request
begins and ends). The sweep (``timeouts.py``, twice a second) ends what overstayed its
phase; ``shed`` closes connections when the cap is reached, in ``shedding.py``'s order: idle
kept-alive connections first, then those that sent nothing, then partial headers, then
bodies below the floor; never a request whose handler runs, never a ring member's.

The request body floor is enforced by failing the body's stream with ``BodyTooSlow``: every
reader of the body (``read_body``, signature checks, JSON bodies) then raises it, and the error
table answers 408 on a connection that closes after it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter
from collections.abc import Callable

from aiohttp import web

from appliance.http.limits import ConnectionSettings

HANDSHAKE, SILENT, IDLE, PARTIAL, REQUEST, CLOSED = range(6)
_PHASES = ("handshake", "silent", "idle", "partial", "request")

# Why connections ended (the ``reason`` label of appliance_connections_closed_total).
REASONS = (
    "header_timeout",
    "idle_timeout",
    "body_too_slow",
    "body_timeout",
    "write_timeout",
    "tls_handshake",
    "shed_idle",
    "shed_silent",
    "shed_partial",
    "shed_slow_body",
    "rejected_cap",
    "rejected_peer",
    "other",  # closed by the client, or by aiohttp after an answer
)


class TrackedConnection:
    """One inbound connection. The streaming code (slow stream readers) reads
    ``write_stalled_s`` and may ``end`` a connection whose reader does not keep up."""

    __slots__ = (
        "tracker",
        "phase",
        "since",
        "opened_at",
        "transport",
        "handler",
        "peer",
        "counted_peer",
        "member",
        "bytes_in",
        "requests",
        "current",
        "checkpoint_t",
        "checkpoint_bytes",
        "write_paused",
        "stall_since",
        "last_buffer",
        "ending",
        "ending_at",
        "head_end",
        "tail",
    )

    def __init__(self, tracker: ConnectionTracker, now: float) -> None:
        self.tracker = tracker
        self.phase = HANDSHAKE
        self.since = now  # when the current phase's clock started
        self.opened_at = now
        self.transport: asyncio.Transport | None = None
        self.handler: object = None  # aiohttp's RequestHandler (request.protocol)
        self.peer = ""
        self.counted_peer = False
        self.member = False
        self.bytes_in = 0
        self.requests = 0
        self.current: web.BaseRequest | None = None
        self.checkpoint_t = now
        self.checkpoint_bytes = 0
        self.write_paused = False
        self.stall_since: float | None = None  # an answer waiting on the client since
        self.last_buffer = 0
        self.ending = ""  # why this connection is being closed ("" while it lives)
        self.ending_at = 0.0
        self.head_end = False  # the blank line that ends a request's headers has arrived
        self.tail = b""  # the last bytes received while headers were partial

    def write_stalled_s(self, now: float | None = None) -> float:
        """Seconds the answer on this connection has waited for the client to read (0 when
        nothing waits): the hook for streaming answers to readers that fall behind."""
        if self.stall_since is None:
            return 0.0
        return (now if now is not None else self.tracker.clock()) - self.stall_since

    def end(self, reason: str) -> None:
        """Close this connection now, counted under ``reason``."""
        self.tracker.close(self, reason)


class ConnectionTracker:
    def __init__(
        self,
        settings: ConnectionSettings,
        cap: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.cap = cap  # 0: no cap (set by the process runner from the descriptor budget)
        self.clock = clock
        self.lag: Callable[[], float] = lambda: 0.0  # the loop's lag (admission measures it)
        self.member_certificates = False  # a TLS peer certificate marks a ring member
        self.phases: list[dict[TrackedConnection, None]] = [{} for _ in _PHASES]
        self.writing: set[TrackedConnection] = set()
        self._by_handler: dict[object, TrackedConnection] = {}
        self._per_peer: Counter[str] = Counter()
        self._member_peers: set[str] = set()
        self.no_slow_until = 0.0  # no slow body to shed until then (shedding.py)
        self.live = 0  # connections not being closed
        self.members = 0
        self.opened = 0
        self.closed: Counter[str] = Counter()
        # imported now, not when shedding: out of descriptors (EMFILE, when it sheds most),
        # a first import cannot open the module's file, and the accept loop then spun on it
        from appliance.http.shedding import victim_for_room  # it reads this module's phases

        self._victim_for_room = victim_for_room

    # --- what the protocol wrapper reports ------------------------------------------------

    def full(self) -> bool:
        return bool(self.cap) and self.live >= self.cap

    def make_room(self) -> bool:
        """At the cap: shed one connection (in the documented order); False if none may go."""
        return self.shed(1) == 1

    def refused(self) -> None:
        """A newcomer was refused at the cap (nothing could be shed for it)."""
        self.opened += 1
        self.closed["rejected_cap"] += 1

    def opening(self) -> TrackedConnection:
        """A connection was accepted (its TLS handshake, if any, still to come)."""
        conn = TrackedConnection(self, self.clock())
        self.opened += 1
        self.live += 1
        self.phases[HANDSHAKE][conn] = None
        return conn

    def handshake_failed(self, conn: TrackedConnection) -> None:
        if conn.phase == HANDSHAKE:
            self.mark_ending(conn, "tls_handshake")
            self.leave(conn)
            conn.phase = CLOSED

    def made(self, conn: TrackedConnection, transport: asyncio.Transport, handler: object) -> bool:
        """The connection is usable (after its handshake); False: it was refused and closed."""
        conn.transport = transport
        if conn.phase != HANDSHAKE:  # ended while its handshake ran
            transport.abort()
            return False
        peer = transport.get_extra_info("peername")
        conn.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if self.member_certificates and transport.get_extra_info("peercert"):
            conn.member = True
            self.members += 1
        elif self._over_peer_limit(conn.peer):
            self.mark_ending(conn, "rejected_peer")
            self.leave(conn)
            conn.phase = CLOSED
            transport.abort()
            return False
        elif self.settings.max_connections_per_peer:
            conn.counted_peer = True
            self._per_peer[conn.peer] += 1
        conn.handler = handler
        self._by_handler[handler] = conn
        self._move(conn, SILENT, conn.opened_at)
        return True

    def first_byte(self, conn: TrackedConnection) -> None:
        """Bytes arrived on a silent or idle connection: headers are on their way."""
        # a fresh connection's header clock runs from its opening, a kept-alive one's from now
        self._move(conn, PARTIAL, conn.opened_at if conn.phase == SILENT else self.clock())
        conn.head_end = False
        conn.tail = b""

    def answered_here(self, conn: TrackedConnection) -> None:
        """A whole request was answered from its bytes (``fast_refusal``): idle again."""
        conn.requests += 1
        self._move(conn, IDLE, self.clock())

    def partial_bytes(self, conn: TrackedConnection, data: bytes) -> None:
        """Bytes of a request whose headers had not ended: did they end now? (aiohttp starts
        the handler an iteration or more later; until then the connection is not slow.)"""
        # a match across two chunks has at most 3 bytes on each side
        if b"\r\n\r\n" in data or b"\r\n\r\n" in conn.tail + data[:3]:
            conn.head_end = True
        conn.tail = (conn.tail + data[-3:])[-3:]

    def paused(self, conn: TrackedConnection) -> None:
        conn.write_paused = True
        if conn.stall_since is None:
            conn.stall_since = self.clock()
        self.writing.add(conn)

    def resumed(self, conn: TrackedConnection) -> None:
        conn.write_paused = False
        conn.stall_since = self.clock()  # the client read: progress

    def lost(self, conn: TrackedConnection) -> None:
        if conn.phase != CLOSED:
            self.leave(conn)
            conn.phase = CLOSED
        self.mark_ending(conn, "other")  # not ended by us: by its client, or by aiohttp
        self.writing.discard(conn)
        self._by_handler.pop(conn.handler, None)
        if conn.counted_peer:
            conn.counted_peer = False
            self._per_peer[conn.peer] -= 1
            if self._per_peer[conn.peer] <= 0:
                del self._per_peer[conn.peer]
        conn.current = None
        conn.transport = None

    # --- what the middleware reports ------------------------------------------------------

    def of(self, request: web.BaseRequest) -> TrackedConnection | None:
        return self._by_handler.get(request.protocol)

    def begin(self, conn: TrackedConnection, request: web.BaseRequest) -> None:
        if conn.phase == CLOSED:
            return
        now = self.clock()
        self._move(conn, REQUEST, now)
        conn.current = request
        conn.checkpoint_t = now
        conn.checkpoint_bytes = conn.bytes_in

    def end(self, conn: TrackedConnection) -> None:
        conn.requests += 1
        conn.current = None
        if conn.phase == REQUEST and not conn.ending:
            self._move(conn, IDLE, self.clock())

    def mark_member(self, conn: TrackedConnection) -> None:
        """A request on this connection proved it comes from a ring member (a valid cluster
        signature): its own limits from now on, and never shed."""
        if conn.member or conn.ending:
            return
        conn.member = True
        self.members += 1
        if conn.counted_peer:  # members do not count against their address's limit
            conn.counted_peer = False
            self._per_peer[conn.peer] -= 1
            self._member_peers.add(conn.peer)

    # --- ending connections ---------------------------------------------------------------

    def close(self, conn: TrackedConnection, reason: str) -> None:
        if conn.ending or conn.phase == CLOSED:
            return
        self.mark_ending(conn, reason)
        self.leave(conn)
        conn.phase = CLOSED
        transport = conn.transport
        if transport is None:
            return
        # a clean FIN when nothing waits to be written; else the bytes would hold it open
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def shed(self, count: int, now: float | None = None) -> int:
        """Close up to ``count`` connections to make room, in ``shedding.py``'s order."""
        now = self.clock() if now is None else now
        shed = 0
        while shed < count:
            victim, reason = self._victim_for_room(self, now)
            if victim is None:
                break
            self.close(victim, reason)
            shed += 1
        return shed

    def abort(self, conn: TrackedConnection) -> None:
        self.leave(conn)
        conn.phase = CLOSED
        if conn.transport is not None:
            conn.transport.abort()

    # --- bookkeeping ----------------------------------------------------------------------

    def mark_ending(self, conn: TrackedConnection, reason: str) -> None:
        if conn.ending:
            return
        conn.ending = reason
        conn.ending_at = self.clock()
        self.closed[reason] += 1
        self.live -= 1
        self._forget_member(conn)

    def _forget_member(self, conn: TrackedConnection) -> None:
        if conn.member:
            self.members -= 1

    def _move(self, conn: TrackedConnection, phase: int, since: float) -> None:
        if conn.phase < len(_PHASES):
            self.phases[conn.phase].pop(conn, None)
        self.phases[phase][conn] = None
        conn.phase = phase
        conn.since = since

    def leave(self, conn: TrackedConnection) -> None:
        if conn.phase < len(_PHASES):
            self.phases[conn.phase].pop(conn, None)

    def _over_peer_limit(self, peer: str) -> bool:
        limit = self.settings.max_connections_per_peer
        if not limit or not peer or peer in self._member_peers:
            return False
        if not self.settings.peer_limit_loopback and _is_loopback(peer):
            return False
        return self._per_peer[peer] >= limit

    def by_phase(self) -> dict[str, int]:
        counts = {name: len(conns) for name, conns in zip(_PHASES, self.phases, strict=True)}
        counts["writing"] = len(self.writing)
        return counts


def _is_loopback(peer: str) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return True  # a Unix socket: the same host
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))
