"""Failover between replicas over real HTTP: who gets ejected, and who does not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from appliance.errors import NoLiveReplica
from appliance.ring.hop_client import HopClient, HopSettings
from appliance.ring.hop_transport import HopPost, HopTransport, aiohttp_post
from appliance.ring.protocol import PeerUrl, RouteStep
from runtime.deadline import Deadline


async def serve(delay_s: float, status: int = 200) -> tuple[web.AppRunner, str]:
    async def hop(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(delay_s)
        return web.Response(status=status, body=b'{"error": "busy"}' if status != 200 else b"ok")

    app = web.Application()
    app.router.add_post("/internal/hop", hop)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture(params=["lean", "aiohttp"])
async def post(request: pytest.FixtureRequest) -> AsyncIterator[HopPost]:
    """Both hop clients behave the same (the lean one is the default; aiohttp's the baseline)."""
    if request.param == "lean":
        transport = HopTransport()
        yield transport.post
        await transport.close()
    else:
        async with aiohttp.ClientSession() as session:
            yield aiohttp_post(session)


@pytest.fixture
async def replicas() -> AsyncIterator[Callable[..., asyncio.Future[str]]]:
    runners: list[web.AppRunner] = []

    async def start(delay_s: float, status: int = 200) -> str:
        runner, url = await serve(delay_s, status)
        runners.append(runner)
        return url

    yield start  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


async def call(client: HopClient, urls: list[str], deadline_s: float) -> bytes:
    route = [RouteStep(0, 1, tuple(PeerUrl(u) for u in urls))]
    body, _ = await client.call(route, "m", "d", "r1", Deadline.after(deadline_s), b"x", None)
    return body


async def test_a_hung_replica_with_its_fair_attempt_is_ejected_and_the_next_answers(
    replicas: Callable[..., asyncio.Future[str]], post: HopPost
) -> None:
    slow, fast = await replicas(5.0), await replicas(0.0)
    client = HopClient(post, HopSettings(min_attempt_s=0.1), seed=1)
    for _ in range(4):
        assert await call(client, [slow, fast], 3.0) == b"ok"
    assert client.is_ejected(slow) and not client.is_ejected(fast)


async def test_a_request_whose_own_deadline_is_tiny_ejects_no_one(
    replicas: Callable[..., asyncio.Future[str]], post: HopPost
) -> None:
    a, b = await replicas(0.2), await replicas(0.2)
    client = HopClient(post, HopSettings(min_attempt_s=1.0), seed=1)
    for _ in range(3):
        with pytest.raises(NoLiveReplica):
            await call(client, [a, b], 0.05)
    assert client.ejected == {}
    assert await call(client, [a, b], 3.0) == b"ok"


async def test_a_503_inside_the_deadline_ejects_and_fails_over(
    replicas: Callable[..., asyncio.Future[str]], post: HopPost
) -> None:
    refusing, good = await replicas(0.0, status=503), await replicas(0.0)
    client = HopClient(post, HopSettings(min_attempt_s=0.05), seed=1)
    for _ in range(3):
        assert await call(client, [refusing, good], 2.0) == b"ok"
    assert client.is_ejected(refusing) and not client.is_ejected(good)


def test_a_hop_carries_the_time_left_and_reads_an_older_peers_epoch_instant() -> None:
    import time

    from appliance.errors import BadRequest
    from appliance.ring.protocol import deadline_header, parse_deadline
    from runtime.deadline import Deadline

    sent = deadline_header(Deadline.after(2.0))
    assert sent.startswith("+") and 1.9 < float(sent) <= 2.0  # no wall clock in it
    assert 1.9 < parse_deadline(sent).remaining() <= 2.0
    assert deadline_header(Deadline.after(-1.0)) == "+0.000000"
    older = f"{time.time() + 3.0:.6f}"  # protocol 2: seconds since the epoch
    assert 2.9 < parse_deadline(older).remaining() <= 3.0
    for bad in (None, "", "soon", "+x"):
        with pytest.raises(BadRequest, match=r"\+SECONDS"):
            parse_deadline(bad)


async def switchable() -> tuple[web.AppRunner, str, dict[str, float]]:
    """A replica whose delay the test changes while it runs."""
    delay = {"s": 0.0}

    async def hop(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(delay["s"])
        return web.Response(body=b"ok")

    app = web.Application()
    app.router.add_post("/internal/hop", hop)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", delay


@pytest.mark.parametrize("ratio", [0.1, 0.0])
async def test_a_hop_slower_than_its_replicas_p99_is_hedged_to_the_next(
    post: HopPost, ratio: float
) -> None:
    import time

    (ra, a, delay_a), (rb, b, _) = await switchable(), await switchable()
    hedged: list[str] = []
    settings = HopSettings(min_attempt_s=1.0, hedge_ratio=ratio)
    client = HopClient(post, settings, seed=3, on_hedge=hedged.append)
    try:
        for _ in range(30):  # each answers in a few ms: each replica's p99 is learned
            assert await call(client, [a], 3.0) == await call(client, [b], 3.0) == b"ok"
        assert hedged == []  # nothing was ever slower than its p99 floor for long
        # a looks the faster (so the balancer picks it first), then hangs (a pulled cable: no
        # reset, no answer)
        client.stats[PeerUrl(b)].ewma_latency_s = 10 * client.stats[PeerUrl(a)].ewma_latency_s
        delay_a["s"] = 5.0
        slowest = 0.0
        for _ in range(4):
            started = time.perf_counter()
            assert await call(client, [a, b], 3.0) == b"ok"
            slowest = max(slowest, time.perf_counter() - started)
        if ratio:
            # the calls that picked a went to b once a was past its p99 (20 ms floor), not
            # after min_attempt_s; the balancer then learned that a is slow
            assert slowest < 0.5, slowest
            assert hedged and set(hedged) <= {b}
            assert client.stats[PeerUrl(a)].ewma_latency_s > client.stats[PeerUrl(b)].ewma_latency_s
        else:
            assert hedged == [] and slowest >= 1.0  # no hedging: the fair attempt ran out first
    finally:
        delay_a["s"] = 0.0
        await ra.cleanup()
        await rb.cleanup()


def test_the_hedge_budget_follows_recent_calls_and_a_p99_needs_samples() -> None:
    from appliance.ring.balancer import HedgeBudget, ReplicaStats, hedge_after, record_latency

    budget = HedgeBudget(ratio=0.1, burst=2, window=100)
    assert [budget.take() for _ in range(3)] == [True, True, False]  # the burst, then none
    for _ in range(50):
        budget.count_call()
    assert sum(budget.take() for _ in range(10)) == 5  # 10 % of 50 calls
    stats = ReplicaStats("a")
    for i in range(19):
        record_latency(stats, 0.001 * (i + 1))
    assert hedge_after(stats, 0.005) is None  # too few answers to know a p99 from
    record_latency(stats, 0.5)  # one outlier among 20: the p99 of 20 is the slowest
    assert hedge_after(stats, 0.005) == 0.5
    assert hedge_after(ReplicaStats("b", recent=stats.recent.copy()), 1.0) == 1.0  # the floor
