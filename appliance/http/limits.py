"""What a server allows one connection, and how many connections it takes: the timeouts of each
phase of a request, the body floor, and the connection budget under the descriptor limit.

Every process runs one of these (``appliance/http/server.py``): the descriptor limit is raised
to its hard limit at start, a reserve is kept for what the process opens itself (hop and
session pools, LMDB, model files, logs), and inbound connections are capped at the rest, so a
flood of connections can never take the descriptors the process needs to answer.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path

from appliance.config import ServerConfig

log = logging.getLogger(__name__)

# Without a readable /proc/sys/fs/nr_open: the kernel's default ceiling for one process.
_NR_OPEN_DEFAULT = 1 << 20


class BodyTooSlow(TimeoutError):
    """The request body arrived below the floor, or not within its limit (maps to 408).

    A TimeoutError, so that aiohttp's lingering read after the 408 stops at once rather than
    logging it as an unhandled error."""


@dataclass(frozen=True)
class ConnectionSettings:
    """The per-connection limits (``ServerConfig``'s connection block, in one object)."""

    header_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    member_idle_timeout_s: float = 90.0
    body_min_bytes_per_s: int = 1024
    body_grace_s: float = 5.0
    body_timeout_s: float = 120.0
    write_timeout_s: float = 30.0
    member_stall_timeout_s: float = 30.0
    tls_handshake_timeout_s: float = 10.0
    max_connections: int = 0
    connection_reserve: int = 0
    max_connections_per_peer: int = 0
    peer_limit_loopback: bool = False
    listen_backlog: int = 4096

    @classmethod
    def of(cls, config: ServerConfig) -> ConnectionSettings:
        return cls(
            header_timeout_s=config.header_timeout_s,
            idle_timeout_s=config.idle_timeout_s,
            member_idle_timeout_s=config.member_idle_timeout_s,
            body_min_bytes_per_s=config.body_min_bytes_per_s,
            body_grace_s=config.body_grace_s,
            body_timeout_s=config.body_timeout_s,
            write_timeout_s=config.write_timeout_s,
            member_stall_timeout_s=config.member_stall_timeout_s,
            tls_handshake_timeout_s=config.tls_handshake_timeout_s,
            max_connections=config.max_connections,
            connection_reserve=config.connection_reserve,
            max_connections_per_peer=config.max_connections_per_peer,
            peer_limit_loopback=config.peer_limit_loopback,
            listen_backlog=config.listen_backlog,
        )

    @property
    def keepalive_backstop_s(self) -> float:
        """aiohttp's own keep-alive timer, behind the tracker's: it never fires first."""
        return max(self.idle_timeout_s, self.member_idle_timeout_s, self.header_timeout_s) + 5


@dataclass(frozen=True)
class Budget:
    """The descriptor limit this process runs under and the inbound connections it takes."""

    descriptors: int  # the soft RLIMIT_NOFILE, after raising it
    reserve: int
    cap: int  # inbound connections at most (above descriptors - reserve only when configured)


def auto_reserve(descriptors: int) -> int:
    """An eighth of the limit, at least 64 and at most 1024: room for the hop pools (64 idle
    connections per peer), the internal session, LMDB's files, model files and logs."""
    return max(64, min(1024, descriptors // 8))


def budget(settings: ConnectionSettings, descriptors: int) -> Budget:
    """The cap: ``max_connections`` if set (it may exceed the limit: for tests of EMFILE), else
    the descriptor limit minus the reserve."""
    reserve = settings.connection_reserve or auto_reserve(descriptors)
    if settings.max_connections:
        return Budget(descriptors, reserve, settings.max_connections)
    return Budget(descriptors, reserve, max(16, descriptors - reserve))


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (bounded by the kernel's nr_open); the
    soft limit in force afterwards. Many systems start processes at 1024 soft, far below the
    hard limit they allow: the difference is connections refused for no reason."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = _nr_open()
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return int(min(soft, ceiling)) if soft != resource.RLIM_INFINITY else ceiling


def current_descriptor_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _nr_open() if soft == resource.RLIM_INFINITY else int(soft)


def _nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text().strip())
    except (OSError, ValueError):
        return _NR_OPEN_DEFAULT


def open_descriptors() -> int | None:
    """Descriptors this process holds now (Linux), for /metrics."""
    try:
        return sum(1 for _ in Path("/proc/self/fd").iterdir())
    except OSError:
        return None
