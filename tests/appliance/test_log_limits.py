"""Repeated log lines are written once per interval with the count of those suppressed; the
access log keeps one line per request; a server's failed accepts are counted, not flooded."""

from __future__ import annotations

import errno
import io
import logging

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from appliance.http import log_limits
from appliance.http.connections import ConnectionTracker
from appliance.http.limits import ConnectionSettings
from appliance.http.log_limits import RepeatFilter
from appliance.http.logs import AccessLogger, configure_logging
from appliance.http.site import AcceptErrors


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _logger(name: str, repeat: RepeatFilter) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(repeat)
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, out


def test_a_repeated_error_is_written_once_per_interval_with_the_count() -> None:
    clock = Clock()
    repeat = RepeatFilter(10.0, clock)
    logger, out = _logger("test.repeat", repeat)
    for i in range(1000):
        logger.warning("refused %s from %s: %s", "/internal/hop", f"10.0.0.{i % 7}", "bad sig")
    logger.error("another kind of line")
    assert out.getvalue().count("refused") == 1 and "another kind" in out.getvalue()
    assert repeat.suppressed_total == 999 and repeat.pending() == 999
    clock.now += 10.5
    logger.warning("refused %s from %s: %s", "/internal/hop", "10.0.0.1", "bad sig")
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("refused /internal/hop from 10.0.0.1: bad sig [999 more")
    assert repeat.pending() == 0


def test_a_flood_that_stops_is_still_reported_by_the_flush() -> None:
    clock = Clock()
    repeat = RepeatFilter(5.0, clock)
    logger, out = _logger("test.flush", repeat)
    for _ in range(50):
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError:
            logger.exception("accept failed")
    assert out.getvalue().count("Traceback") == 1
    repeat.flush()  # the interval is not over: nothing to say yet
    assert "suppressed" not in out.getvalue()
    clock.now += 6
    repeat.flush()
    assert "49 more line(s) like 'accept failed' (OSError) were suppressed" in out.getvalue()


def test_the_access_log_and_debug_lines_are_never_suppressed() -> None:
    repeat = RepeatFilter(10.0, Clock())
    access, out = _logger("appliance.access", repeat)
    for _ in range(20):
        access.info('%s "%s %s" %d', "127.0.0.1", "POST", "/v2/models/demo/infer", 503)
    assert out.getvalue().count("infer") == 20
    chatty, out = _logger("test.debug", repeat)
    chatty.setLevel(logging.DEBUG)
    for _ in range(5):
        chatty.debug("detail")
    assert out.getvalue().count("detail") == 5


def test_the_access_log_lines_of_bodies_that_never_came_are_one_per_interval() -> None:
    """A 408 (a body below the floor) is a stalled connection, not traffic: at 20,000 of them
    its lines wrote 4 MB in 30 s. They share one kind, whatever their path; others stay."""
    clock = Clock()
    repeat = RepeatFilter(10.0, clock)
    access, out = _logger("appliance.access", repeat)
    writer = AccessLogger(access, "")
    for i in range(300):
        request = make_mocked_request("POST", f"/v2/models/m{i % 3}/infer")
        writer.log(request, web.Response(status=408), 5.0)
        writer.log(request, web.Response(status=200), 0.01)
    lines = out.getvalue().splitlines()
    assert sum('" 408 ' in line for line in lines) == 1 and len(lines) == 301
    clock.now += 10.5
    writer.log(make_mocked_request("PUT", "/x"), web.Response(status=408), 5.0)
    assert (
        out.getvalue()
        .splitlines()[-1]
        .endswith("[299 more like this suppressed in the last 10 s or more]")
    )


def test_configure_logging_installs_the_filter_on_the_one_handler() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    flags = logging._srcfile, logging.logThreads, logging.logProcesses
    try:
        configure_logging("info", "text", repeat_interval_s=3.0)
        installed = log_limits.installed()
        assert installed is not None and installed.interval_s == 3.0
        assert installed in root.handlers[0].filters
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logging._srcfile, logging.logThreads, logging.logProcesses = flags


def test_failed_accepts_are_counted_logged_once_and_shed_connections(caplog) -> None:
    errors = AcceptErrors(interval_s=10.0)
    tracker = ConnectionTracker(ConnectionSettings())
    caplog.set_level(logging.INFO)
    exc = OSError(errno.EMFILE, "Too many open files")
    for _ in range(4096):  # what one tick of asyncio's own accept loop would try at EMFILE
        errors.failed(exc, tracker)
    assert errors.counts["EMFILE"] == 4096
    lines = [r.getMessage() for r in caplog.records if "accept failed" in r.getMessage()]
    assert lines == [
        "accept failed 1 time(s) in the last 0 s (EMFILE: Too many open files); shedding "
        "connections"
    ]


async def test_a_flood_of_malformed_requests_writes_a_line_or_two_not_a_traceback_each() -> None:
    import asyncio

    from appliance.config import ServerConfig
    from appliance.http.app import new_app
    from appliance.http.server import start_app

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    flags = logging._srcfile, logging.logThreads, logging.logProcesses
    out = io.StringIO()
    try:
        configure_logging("info", "text")
        root.handlers[0].stream = out  # type: ignore[attr-defined]
        runner, port = await start_app(new_app(ServerConfig()), "127.0.0.1", 0)
        try:
            for _ in range(200):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /\x00\x01 HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
                assert b" 400 " in (await reader.read(100))[:20]
                writer.close()
        finally:
            await runner.cleanup()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logging._srcfile, logging.logThreads, logging.logProcesses = flags
    text = out.getvalue()
    assert text.count("Error handling request") <= 2, text[:2000]
    assert text.count("Traceback") <= 2 and len(text) < 20_000


def test_info_lines_are_suppressed_only_when_they_say_the_same_thing_again() -> None:
    repeat = RepeatFilter(10.0, Clock())
    events, out = _logger("test.events", repeat)
    for node in ("local-0", "local-1", "local-1"):
        events.info("node %s left", node)
    assert out.getvalue().count("local-0 left") == 1 and out.getvalue().count("local-1 left") == 1
