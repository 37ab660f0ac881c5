"""systemd's notify protocol (sd_notify): a datagram to $NOTIFY_SOCKET, no dependency needed.

``READY=1`` once models are loaded and warm, ``STATUS=...`` while loading, ``WATCHDOG=1`` from the
event loop (a wedged loop stops pinging and systemd restarts the unit), ``STOPPING=1`` on stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send ``message`` (e.g. "READY=1") to systemd; False when not run under a notify unit."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)
        return False


def watchdog_interval_s() -> float | None:
    """Half of WatchdogSec when systemd asked this process for pings, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 1e6 / 2)
    except ValueError:
        return None


async def watchdog_forever(interval_s: float) -> None:
    """Ping from the event loop itself: only a loop that still runs keeps the unit alive."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)


def start_watchdog() -> asyncio.Task[None] | None:
    interval = watchdog_interval_s()
    if interval is None:
        return None
    return asyncio.get_running_loop().create_task(watchdog_forever(interval))
