"""The one process runner: listen, announce, catch SIGINT/SIGTERM, drain, stop; and what every
listening socket gets: the descriptor limit raised, the connection budget, timeouts on every
phase of a request, shedding near the cap, admission by load (``guards.py``).

Every server process (a node, a coordinator, ``appliance serve``) runs through ``Server``, as
uvicorn's one ``Server`` class owns signals, startup and graceful shutdown, so no entry point
writes its own copy of them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from appliance.config import ServerConfig
from appliance.http import log_limits
from appliance.http.guards import GUARDS, Guards, connection_middleware
from appliance.http.limits import (
    Budget,
    ConnectionSettings,
    current_descriptor_limit,
    raise_descriptor_limit,
)
from appliance.http.limits import budget as connection_budget
from appliance.http.logs import AccessLogger
from appliance.http.site import ACCEPT_ERRORS, GuardedSite
from appliance.sd_notify import notify, start_watchdog
from appliance.security.tls import server_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listening:
    runner: web.AppRunner
    port: int
    url: str  # scheme://host:port, the bound port filled in


async def start_app(
    app: web.Application,
    host: str,
    port: int,
    access_log: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    budget: Budget | None = None,
) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0 = any free port); returns the runner and the bound port.

    Connections go through the app's guards (``new_app`` made them; a bare app gets default
    ones): every phase of a request has its timeout, inbound connections are capped by
    ``budget`` (default: the current descriptor limit minus the reserve), and inference
    requests are admitted by the loop's lag."""
    guards = app.get(GUARDS)
    if guards is None:  # an app not made by new_app: track its connections all the same
        guards = Guards.of(None)
        app[GUARDS] = guards
        app.middlewares.insert(0, connection_middleware(guards.tracker))
    settings = guards.settings

    async def stop_guards(app: web.Application) -> None:
        await guards.stop()

    app.on_cleanup.append(stop_guards)
    guards.access_log = logging.getLogger("appliance.access") if access_log else None
    runner = web.AppRunner(
        app,
        access_log=guards.access_log,
        access_log_class=AccessLogger,
        handler_cancellation=True,  # a client that goes away cancels its queued work
        auto_decompress=False,  # body.py decodes, so the size limit holds after decompression
        keepalive_timeout=settings.keepalive_backstop_s,  # the tracker ends idle ones first
    )
    await runner.setup()
    guards.start(budget or connection_budget(settings, current_descriptor_limit()))
    site = GuardedSite(
        runner,
        host,
        port,
        guards.tracker,
        ssl_context,
        settings.listen_backlog,
        settings.tls_handshake_timeout_s,
        guards.fast,
    )
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, int(bound)


async def listen(app: web.Application, config: ServerConfig) -> Listening:
    tls = server_context(config.tls_cert, config.tls_key, config.tls_ca)
    repeat = log_limits.installed()
    if repeat is not None:
        repeat.interval_s = config.log_repeat_interval_s
    ACCEPT_ERRORS.interval_s = config.log_repeat_interval_s or 1.0
    descriptors = raise_descriptor_limit()
    budget = connection_budget(ConnectionSettings.of(config), descriptors)
    if budget.cap > descriptors - budget.reserve:
        log.warning(
            "max_connections %d is above the descriptor limit %d minus the reserve %d: "
            "inbound connections may exhaust the descriptors this process needs",
            budget.cap,
            descriptors,
            budget.reserve,
        )
    log.info(
        "descriptor limit %d: up to %d inbound connections, %d kept in reserve",
        descriptors,
        budget.cap,
        budget.reserve,
    )
    runner, port = await start_app(app, config.host, config.port, config.access_log, tls, budget)
    host = f"[{config.host}]" if ":" in config.host else config.host
    return Listening(runner, port, f"{'https' if tls else 'http'}://{host}:{port}")


# The body of a process once it listens: it returns the exit status, or waits for ``stop``.
Main = Callable[[Listening, asyncio.Event], Awaitable[int]]
Hook = Callable[[], Awaitable[None]]


class Server:
    """One server process: ``serve`` listens, prints ``{what} listening on URL`` (the one line
    scripts and tests read), runs ``main`` until it returns or a signal arrives, then runs the
    ``before_stop`` hooks in order (say goodbye, stop children) and closes the app, which lets
    in-flight requests finish."""

    def __init__(self, app: web.Application, config: ServerConfig, what: str | None) -> None:
        """``what``: the name in the listening line; None when ``main`` prints its own line
        (``appliance serve`` prints it once its ring is placed)."""
        self.app = app
        self.config = config
        self.what = what
        self.stop = asyncio.Event()
        self.before_stop: list[Hook] = []

    async def serve(self, main: Main | None = None) -> int:
        listening = await listen(self.app, self.config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        watchdog = start_watchdog()
        try:
            if self.what is not None:
                print(f"{self.what} listening on {listening.url}", flush=True)
            if main is None:
                await self.stop.wait()
                return 0
            return await main(listening, self.stop)
        finally:
            log.info("stopping: finishing in-flight requests")
            notify("STOPPING=1")
            if watchdog is not None:
                watchdog.cancel()
            for hook in self.before_stop:
                try:
                    await hook()
                except Exception:  # one failing goodbye must not skip the others
                    log.exception("while stopping")
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await listening.runner.cleanup()  # stops accepting, lets in-flight finish (bounded)
