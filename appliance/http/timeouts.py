"""The connection tracker's sweep (twice a second, from the process runner): every phase of a
connection has its limit, and what overstays it ends, counted by reason. Headers must come
within ``header_timeout_s`` (from the opening, or from the first byte on a kept-alive
connection), an idle connection goes after ``idle_timeout_s`` (a ring member's after
``member_idle_timeout_s``), a body must keep above the floor (``body_min_bytes_per_s`` over
every ``body_grace_s``) and be whole within ``body_timeout_s``, else its readers get
``BodyTooSlow`` (408), and an answer that makes no progress for ``write_timeout_s`` (a client
that does not read) ends its connection.
"""

from __future__ import annotations

from aiohttp import web

from appliance.http.connections import (
    HANDSHAKE,
    IDLE,
    PARTIAL,
    REQUEST,
    SILENT,
    ConnectionTracker,
    TrackedConnection,
)
from appliance.http.limits import BodyTooSlow

# A connection answered 408 that is still open this long after is aborted.
_ENDING_GRACE_S = 2.0


def sweep(tracker: ConnectionTracker) -> None:
    now = tracker.clock()
    s = tracker.settings
    for conn in list(tracker.phases[HANDSHAKE]):
        if now - conn.opened_at > s.tls_handshake_timeout_s + 1:
            tracker.handshake_failed(conn)  # in case its end was not reported
    for conn in list(tracker.phases[SILENT]):
        if now - conn.since <= s.header_timeout_s:
            break  # in opening order: the rest are younger
        tracker.close(conn, "header_timeout")
    for conn in list(tracker.phases[PARTIAL]):
        if now - conn.since > s.header_timeout_s:
            tracker.close(conn, "header_timeout")
    for conn in list(tracker.phases[IDLE]):
        transport = conn.transport
        if transport is not None and transport.get_write_buffer_size():
            _watch_write(tracker, conn, now)  # an answer still on its way out: not idle
            continue
        limit = s.member_idle_timeout_s if conn.member else s.idle_timeout_s
        if now - conn.since > limit:
            tracker.close(conn, "idle_timeout")
    for conn in list(tracker.phases[REQUEST]):
        _check_body(tracker, conn, now)
    for conn in list(tracker.writing):
        _check_write(tracker, conn, now)


def _check_body(tracker: ConnectionTracker, conn: TrackedConnection, now: float) -> None:
    request, transport, s = conn.current, conn.transport, tracker.settings
    if conn.ending:
        if now - conn.ending_at > _ENDING_GRACE_S:
            tracker.abort(conn)
        return
    if request is None or transport is None or request.content.is_eof():
        return  # the whole body is in: the handler runs, bounded by its own deadline
    if not transport.is_reading():
        # aiohttp paused reading because the handler has not consumed what came: the
        # client is not the slow one
        conn.checkpoint_t, conn.checkpoint_bytes = now, conn.bytes_in
        return
    window = now - conn.checkpoint_t
    got = conn.bytes_in - conn.checkpoint_bytes
    if conn.member:
        if got:
            conn.checkpoint_t, conn.checkpoint_bytes = now, conn.bytes_in
        elif window > s.member_stall_timeout_s:
            _too_slow(tracker, conn, request, "body_timeout")
        return
    if s.body_timeout_s and now - conn.since > s.body_timeout_s:
        _too_slow(tracker, conn, request, "body_timeout")
    elif s.body_min_bytes_per_s and window >= s.body_grace_s:
        if got < s.body_min_bytes_per_s * window:
            _too_slow(tracker, conn, request, "body_too_slow")
        else:
            conn.checkpoint_t, conn.checkpoint_bytes = now, conn.bytes_in


def _too_slow(
    tracker: ConnectionTracker, conn: TrackedConnection, request: web.BaseRequest, reason: str
) -> None:
    s = tracker.settings
    tracker.mark_ending(conn, reason)
    if reason == "body_timeout":
        message = f"the request body did not arrive within {s.body_timeout_s:g} s"
    else:
        message = (
            f"the request body arrived below {s.body_min_bytes_per_s} bytes/s over "
            f"{s.body_grace_s:g} s"
        )
    # every reader of the body raises it now: 408 from the error table
    request.content.set_exception(BodyTooSlow(message))


def _watch_write(tracker: ConnectionTracker, conn: TrackedConnection, now: float) -> None:
    if conn not in tracker.writing:
        tracker.writing.add(conn)
        conn.stall_since = now
        conn.last_buffer = 0


def _check_write(tracker: ConnectionTracker, conn: TrackedConnection, now: float) -> None:
    transport = conn.transport
    if transport is None:
        tracker.writing.discard(conn)
        return
    size = transport.get_write_buffer_size()
    if not size and not conn.write_paused:
        tracker.writing.discard(conn)
        conn.stall_since = None
        return
    if conn.stall_since is None or size < conn.last_buffer:
        conn.stall_since = now  # the client read some: progress
    conn.last_buffer = size
    s = tracker.settings
    limit = s.member_stall_timeout_s if conn.member else s.write_timeout_s
    if now - conn.stall_since > limit:
        tracker.mark_ending(conn, "write_timeout")
        tracker.abort(conn)
