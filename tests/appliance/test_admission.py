"""Admission by event-loop lag: the controller on its own, then a real server whose handlers
hold the loop, where inference requests past the limit get 503 + Retry-After at once and
everything else is still answered."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from aiohttp import web

from appliance.config import ServerConfig
from appliance.http.admission import Admission, governed
from appliance.http.app import new_app
from appliance.http.guards import GUARDS
from appliance.http.server import start_app


def _window(admission: Admission, start: float, lags: list[float]) -> float:
    """Feed a window of lag samples, 12 ms apart (a little over the controller's 100 ms in
    all); the time after it."""
    for i, lag in enumerate(lags):
        admission.observe(lag, now=start + i * 0.012)
    return start + len(lags) * 0.012


def test_the_limit_is_cut_on_a_standing_lag_and_grows_back_when_calm() -> None:
    admission = Admission(0.025, max_limit=1000, min_limit=8, start_limit=1000)
    admission.in_flight = 100
    now = _window(admission, 0.0, [0.001] * 11)
    assert admission.limit == 1000 and admission.cuts == 0
    now = _window(admission, now, [0.001] * 9 + [0.09])  # one slow callback: no cut
    assert admission.limit == 1000
    now = _window(admission, now, [0.03] * 10)  # one window: another process's stall maybe
    assert admission.limit == 1000
    now = _window(admission, now, [0.03] * 10)  # two: a standing queue, cut below in flight
    assert admission.limit == 80 and admission.cuts == 1
    assert admission.over_limit() and admission.refused == 1
    admission.in_flight = 10
    now = _window(admission, now, [0.03] * 10)
    assert admission.limit == 8  # never below the floor: a few always pass
    admission.in_flight = 3
    now = _window(admission, now, [0.2] * 10)  # lag with few in flight is not theirs: no cut
    assert admission.cuts == 2 and admission.limit == 8
    admission.in_flight = 50
    admission.observe(0.3, now=now + 0.5)  # far behind: cut at once, not at the window's end
    assert admission.cuts == 3 and admission.limit == 8
    now += 1.0
    admission.in_flight = 0
    for _ in range(10):  # calm, but the limit is not reached: it stays (but for the first)
        now = _window(admission, now, [0.001] * 10)
    assert admission.limit < 10
    for _ in range(70):  # calm and the limit reached every window: back to no limit in 7 s
        admission.in_flight = int(admission.limit)
        admission.enter()
        admission.release()
        now = _window(admission, now, [0.001] * 10)
    assert admission.limit == 1000


def test_a_limit_starts_at_64_and_is_never_cut_below_32() -> None:
    admission = Admission(0.025)
    assert admission.limit == 64 and admission.min_limit == 32
    admission.in_flight = 30
    now = _window(admission, 0.0, [0.2] * 30)
    assert admission.cuts == 0 and admission.limit == 64  # 30 in flight: not theirs
    admission.in_flight = 60
    _window(admission, now, [0.05] * 10)  # (the windows before were above the target too)
    assert admission.limit == 48 and admission.over_limit()  # 60 in flight: refused


def test_only_inference_requests_are_governed() -> None:
    assert governed("POST", "/v2/models/demo/infer")
    assert governed("POST", "/v2/models/demo/versions/1/infer")
    assert not governed("POST", "/v2/models/llm/generate_stream")  # generation: its own
    assert not governed("POST", "/v1/chat/completions")
    assert not governed("GET", "/v2/models/demo")
    assert not governed("POST", "/v2/repository/models/demo/load")
    assert not governed("POST", "/internal/hop")
    assert not governed("GET", "/v2/health/ready")


async def _infer(request: web.Request) -> web.Response:
    await request.read()
    # a hop: the request stays in flight, the loop is free meanwhile; long enough that the 40
    # are still in flight when the 20 come, even with the loop held and the machine busy
    await asyncio.sleep(1.5)
    return web.Response(text="done")


async def _hold_the_loop(stop: asyncio.Event) -> None:
    """40 ms of every 50 ms spent in callbacks: the loop of a server past its capacity."""
    while not stop.is_set():
        time.sleep(0.04)
        await asyncio.sleep(0.01)


async def _live(request: web.Request) -> web.Response:
    return web.Response(text="live")


async def test_a_lagging_server_refuses_inference_fast_and_still_answers_health() -> None:
    app = new_app(ServerConfig(overload_lag_ms=25))
    app.add_routes([web.post("/v2/models/hog/infer", _infer), web.get("/v2/health/live", _live)])
    runner, port = await start_app(app, "127.0.0.1", 0)
    admission = app[GUARDS].admission
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
        ) as client:

            async def infer() -> tuple[int, str | None, float]:
                started = time.monotonic()
                async with client.post(url + "/v2/models/hog/infer", data=b"{}") as response:
                    await response.read()
                    return (
                        response.status,
                        response.headers.get("Retry-After"),
                        (time.monotonic() - started),
                    )

            first = [asyncio.ensure_future(infer()) for _ in range(40)]
            for _ in range(200):  # all 40 in flight (a hop of 1.5 s each)
                if admission.in_flight == 40:
                    break
                await asyncio.sleep(0.01)
            assert admission.in_flight == 40
            stop = asyncio.Event()
            hold = asyncio.ensure_future(_hold_the_loop(stop))
            await asyncio.sleep(0.4)  # the loop lags: the limit falls below what is in flight
            assert admission.cuts >= 1 and admission.limit < admission.in_flight
            second = await asyncio.gather(*[infer() for _ in range(20)])
            async with client.get(url + "/v2/health/live") as response:
                assert response.status == 200
            stop.set()
            await hold
            answered = await asyncio.gather(*first)
            assert [status for status, _, _ in answered] == [200] * 40
            refused = [r for r in second if r[0] == 503]
            assert len(refused) >= 10
            assert all(retry == "1" for _, retry, _ in refused)
            # refused without waiting for the hogs: at most a handler's hold or two
            assert max(seconds for _, _, seconds in refused) < 0.5
            await asyncio.sleep(2.5)  # calm again: the limit grows back
            status, _, _ = await infer()
            assert status == 200 and admission.in_flight == 0
    finally:
        await runner.cleanup()


async def test_over_the_limit_a_whole_request_is_refused_from_its_bytes_on_a_live_connection(
    caplog,
) -> None:
    app = new_app(ServerConfig(overload_lag_ms=25))
    app.add_routes([web.post("/v2/models/hog/infer", _infer)])
    runner, port = await start_app(app, "127.0.0.1", 0, access_log=True)
    guards = app[GUARDS]
    caplog.set_level(logging.INFO, logger="appliance.access")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"inputs": []}'
        request = (
            b"POST /v2/models/hog/infer HTTP/1.1\r\nHost: x\r\nX-Request-Id: abc-1\r\n"
            b"Inference-Header-Content-Length: %d\r\n"  # binary requests carry it
            b"Content-Length: %d\r\n\r\n%s" % (len(body), len(body), body)
        )
        guards.admission.limit = 0  # as after a cut, with requests in flight
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        answer = await reader.readexactly(length)
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
        assert b"X-Request-Id: abc-1" in head and b'"error"' in answer
        assert guards.fast is not None and guards.fast.answered == 1
        # not whole in one read (its body comes later): aiohttp's, refused by the middleware
        writer.write(request[:-4])
        await asyncio.sleep(0.05)
        writer.write(request[-4:])
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and guards.fast.answered == 1
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        guards.admission.limit = 100  # calm again: the same connection is served
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        writer.close()
    finally:
        await runner.cleanup()
    access = [r for r in caplog.records if r.name == "appliance.access"]
    assert access[0].getMessage().startswith('127.0.0.1 "POST /v2/models/hog/infer" 503 ')
    assert getattr(access[0], "request_id", None) == "abc-1" and len(access) == 3


def _answers(admission: Admission, seconds: list[float]) -> None:
    admission.in_flight += len(seconds)
    for s in seconds:
        admission.release(s)


def test_a_queue_past_the_loop_is_cut_though_the_loop_is_calm() -> None:
    """Requests waiting on the nodes do not lag the coordinator's loop: a window in which even
    the fastest request answered took 8x the fastest of the last 30 s (and more than the lag
    target) cuts the limit; faster ones do not, nor does a window with no answer."""
    admission = Admission(0.025, max_limit=1000, min_limit=8, start_limit=1000)
    admission.in_flight = 100
    now = _window(admission, 0.0, [0.001] * 11)
    _answers(admission, [0.010, 0.05, 0.2])  # the floor: 10 ms
    now = _window(admission, now, [0.001] * 10)
    _answers(admission, [0.07, 0.9, 0.4])  # the fastest 70 ms: under 8 x 10 ms, no queue
    now = _window(admission, now, [0.001] * 10)
    assert admission.cuts == 0 and admission.limit == 1000
    assert admission.floor_s == 0.010 and admission.fastest_s == 0.07
    now = _window(admission, now, [0.001] * 10)  # no answer at all: says nothing
    assert admission.cuts == 0
    _answers(admission, [0.09, 2.0, 6.0])  # even the fastest waited 90 ms: a standing queue
    now = _window(admission, now, [0.001] * 10)
    assert admission.cuts == 1 and admission.limit == 80


def test_a_model_whose_every_answer_is_slow_has_no_queue_until_its_answers_slow_down() -> None:
    """The queue rule is relative: answers of 0.3-0.5 s from a slow model, for a minute, cut
    nothing; once the 30 s the floor spans have passed, its own fastest is the floor."""
    admission = Admission(0.025, max_limit=1000, min_limit=8, start_limit=1000)
    admission.in_flight = 100
    now = _window(admission, 0.0, [0.001] * 11)
    for i in range(500):  # 60 s of windows
        _answers(admission, [0.3 + 0.2 * (i % 2), 0.6])
        now = _window(admission, now, [0.001] * 10)
    assert admission.cuts == 0 and admission.floor_s == 0.3
    _answers(admission, [2.5, 3.0])  # over 8 x 0.3 s: queued
    _window(admission, now, [0.001] * 10)
    assert admission.cuts == 1


def test_each_model_is_compared_with_its_own_floor() -> None:
    """A fast model's 5 ms answers do not make a slow model's steady 0.3 s a queue; the slow
    model's answers slowing to 8x its own floor do, though the fast model still answers."""
    admission = Admission(0.025, max_limit=1000, min_limit=8, start_limit=1000)
    admission.in_flight = 100
    now = _window(admission, 0.0, [0.001] * 11)
    fast, slow = "/v2/models/fast/infer", "/v2/models/slow/infer"
    for _ in range(20):
        admission.in_flight += 2
        admission.release(0.005, fast)
        admission.release(0.3, slow)
        now = _window(admission, now, [0.001] * 10)
    assert admission.cuts == 0
    admission.in_flight += 2
    admission.release(0.005, fast)
    admission.release(2.5, slow)
    _window(admission, now, [0.001] * 10)
    assert admission.cuts == 1 and (admission.fastest_s, admission.floor_s) == (2.5, 0.3)


async def _slow_or_bad(request: web.Request) -> web.Response:
    if request.query.get("bad"):
        return web.json_response({"error": "bad input"}, status=400)  # answered at once
    await asyncio.sleep(0.05)
    return web.Response(text="{}")


async def test_only_answers_given_as_asked_set_a_models_floor() -> None:
    """Through a real server: a model's fast 400s are not its floor (they would make its
    every real answer look queued), and each path keeps its own."""
    app = new_app(ServerConfig(overload_lag_ms=25))
    app.add_routes([web.post("/v2/models/{name}/infer", _slow_or_bad)])
    runner, port = await start_app(app, "127.0.0.1", 0)
    admission = app[GUARDS].admission
    url = f"http://127.0.0.1:{port}/v2/models/%s/infer"
    try:
        async with aiohttp.ClientSession() as client:
            for query in ("?bad=1", "", "?bad=1", ""):
                async with client.post(url % "a" + query, data=b"{}") as response:
                    assert response.status == (400 if query else 200)
            async with client.post(url % "b" + "?bad=1", data=b"{}") as response:
                assert response.status == 400
        await asyncio.sleep(0.25)  # the controller closes its windows
        floor_a = admission.answers.floor("/v2/models/a/infer")
        assert 0.05 <= floor_a < 1.0, floor_a
        assert admission.answers.floor("/v2/models/b/infer") == 0.0  # never answered as asked
    finally:
        await runner.cleanup()
