"""Whom to close when the connection cap is reached, in order: an idle kept-alive
connection (the longest idle first), one that sent nothing, one whose headers never ended,
then one whose body is below the floor; never a ring member's, never a request whose body is
in (its handler runs). Each must have been in its phase at least ``SHED_MIN_AGE_S`` plus the
loop's lag, and have nothing in the kernel the loop has not read yet: a busy loop reads late,
and a client it has not read is not silent, only not yet heard.
"""

from __future__ import annotations

import fcntl
import sys
import termios

from appliance.http.connections import (
    IDLE,
    PARTIAL,
    REQUEST,
    SILENT,
    ConnectionTracker,
    TrackedConnection,
)

SHED_MIN_AGE_S = 0.1
# After a scan found no slow body to shed, newcomers are refused without scanning again.
_SLOW_SCAN_BACKOFF_S = 0.1


def victim_for_room(tracker: ConnectionTracker, now: float) -> tuple[TrackedConnection | None, str]:
    """The connection to close for a newcomer, and why; (None, \"\") when none may go."""
    min_age = SHED_MIN_AGE_S + tracker.lag()
    young = now - min_age
    for conn in tracker.phases[IDLE]:  # in the order they went idle: the longest first
        if conn.since > young:
            break
        if not conn.member and not has_unsent_or_unread(conn):
            return conn, "shed_idle"
    for conn in tracker.phases[SILENT]:  # in opening order
        if conn.since > young:
            break
        if not conn.member and not has_unsent_or_unread(conn):
            return conn, "shed_silent"
    for conn in tracker.phases[PARTIAL]:
        if conn.since > young or conn.member or conn.head_end:
            continue  # headers in whole: its handler starts when the loop gets to it
        if not has_unsent_or_unread(conn):
            return conn, "shed_partial"
    if now < tracker.no_slow_until:
        return None, ""
    floor = tracker.settings.body_min_bytes_per_s
    for conn in tracker.phases[REQUEST]:
        request = conn.current
        if conn.member or request is None or request.content.is_eof() or conn.ending:
            continue  # a ring member's, or a handler that runs: never
        age = now - conn.checkpoint_t
        slow = age >= min_age and conn.bytes_in - conn.checkpoint_bytes < floor * age
        if slow and not has_unsent_or_unread(conn):
            return conn, "shed_slow_body"
    tracker.no_slow_until = now + _SLOW_SCAN_BACKOFF_S
    return None, ""


def has_unsent_or_unread(conn: TrackedConnection) -> bool:
    """Whether an answer is still being written, or request bytes wait in the kernel that the
    loop has not read yet (a busy loop reads late: the client is not silent, we are slow)."""
    transport = conn.transport
    if transport is None:
        return False
    if transport.get_write_buffer_size():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        waiting = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return int.from_bytes(waiting, sys.byteorder) > 0
