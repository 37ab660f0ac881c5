"""What protects one server process: the connection tracker, admission by event-loop lag and
the metrics of both. The app factory makes it (its middlewares need it), the process runner
starts it with the socket (the descriptor budget, the sweep, the lag monitor) and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry

from appliance.config import ServerConfig
from appliance.http import log_limits
from appliance.http.admission import Admission
from appliance.http.connections import ConnectionTracker, TrackedConnection
from appliance.http.fast_refusal import FastRefusal
from appliance.http.limits import Budget, ConnectionSettings
from appliance.http.timeouts import sweep
from appliance.security.signing import SENDER

SWEEP_S = 0.5  # how often overdue connections are ended: timeouts hold to +0.5 s
_FLUSH_EVERY = 4  # sweeps between reports of suppressed log lines


@dataclass
class Guards:
    settings: ConnectionSettings
    tracker: ConnectionTracker
    admission: Admission
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    budget: Budget | None = None
    access_log: logging.Logger | None = None  # set by the runner when it keeps one
    fast: FastRefusal | None = None
    _sweeper: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, config: ServerConfig | None) -> Guards:
        from appliance.http.server_metrics import GuardCollector

        settings = ConnectionSettings.of(config) if config is not None else ConnectionSettings()
        lag_ms = config.overload_lag_ms if config is not None else 25.0
        guards = cls(settings, ConnectionTracker(settings), Admission(lag_ms / 1000))
        admission = guards.admission
        guards.tracker.lag = lambda: admission.lag_recent_s
        guards.fast = FastRefusal(admission, lambda: guards.access_log)
        guards.registry.register(GuardCollector(guards))
        return guards

    def start(self, budget: Budget) -> None:
        self.budget = budget
        self.tracker.cap = budget.cap
        self.admission.start()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        await self.admission.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(SWEEP_S)
            sweep(self.tracker)
            ticks += 1
            repeat = log_limits.installed()
            if repeat is not None and ticks % _FLUSH_EVERY == 0:
                repeat.flush()


GUARDS = web.AppKey("guards", Guards)


def connection_of(request: web.Request) -> TrackedConnection | None:
    """The tracked connection a request arrived on (None for a server not started by the
    process runner): the hook for handlers that stream, to see whether their reader keeps up
    (``write_stalled_s``) and to end a connection whose reader fell behind (``end``)."""
    guards = request.config_dict.get(GUARDS)
    return guards.tracker.of(request) if guards is not None else None


def connection_middleware(tracker: ConnectionTracker) -> Middleware:
    """Outermost: tells the tracker when a request's handler starts and ends, and closes the
    connection after an answer to a body that was too slow."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = tracker.of(request)
        if conn is None:
            return await handler(request)
        tracker.begin(conn, request)
        try:
            response = await handler(request)
            if conn.ending:
                response.force_close()  # the client was too slow: answered, then closed
            return response
        finally:
            tracker.end(conn)

    return middleware


def member_middleware(tracker: ConnectionTracker) -> Middleware:
    """On the internal sub-application, after the signature check: a request that passed it
    makes its connection a ring member's."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.get(SENDER) is not None:
            conn = tracker.of(request)
            if conn is not None:
                tracker.mark_member(conn)
        return await handler(request)

    return middleware
