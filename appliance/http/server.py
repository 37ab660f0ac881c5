"""The one process runner: listen, announce, catch SIGINT/SIGTERM, drain, stop.

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
from appliance.http.logs import AccessLogger
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
) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0 = any free port); returns the runner and the bound port."""
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("appliance.access") if access_log else None,
        access_log_class=AccessLogger,
        handler_cancellation=True,  # a client that goes away cancels its queued work
        auto_decompress=False,  # body.py decodes, so the size limit holds after decompression
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, int(bound)


async def listen(app: web.Application, config: ServerConfig) -> Listening:
    tls = server_context(config.tls_cert, config.tls_key, config.tls_ca)
    runner, port = await start_app(app, config.host, config.port, config.access_log, tls)
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
