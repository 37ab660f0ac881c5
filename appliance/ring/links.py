"""What a process knows of its links to other ring members: latency and throughput.

Every call to a member (hops, generation steps, probes) is timed by the caller, and the callee
says in ``X-Appliance-Server-Time`` how long it spent on the call once its body was in (its own
compute plus its calls further down the ring). The difference is the link's share: sending the
body, the answer's way back, and the two event loops picking them up. Small calls (at most
``SMALL_BYTES`` both ways) measure the latency; large ones, less that latency, the throughput.
A probe when a member is first seen gives figures before there is traffic: the least of a few
empty round trips, and one call of ``link_probe_bytes``.

Nodes report their table in heartbeats; the coordinator adds its own and shows them all in
``GET /v2/cluster``; placement and the choice of a sequence's chain read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.headers import SERVER_TIME
from appliance.ring.hop_transport import HopAnswer, HopPost

log = logging.getLogger(__name__)

SMALL_BYTES = 64 * 1024  # a call this small (both ways) is all latency on any real link
ALPHA = 0.2  # EWMA weight of a new sample
PROBE_PATH = "/internal/probe"
PROBE_ROUNDS = 3


def peer_of(url: str) -> str:
    """A member's base URL (scheme://host:port) from any URL on it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def server_seconds(answer: HopAnswer) -> float | None:
    """What the callee says it spent on the call, or None (an older peer, a bad value)."""
    try:
        value = float(answer.headers.get(SERVER_TIME.lower(), ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


@dataclass
class LinkStats:
    """One link, from this process to ``peer``."""

    peer: str
    latency_s: float = 0.0  # EWMA over small calls
    latency_samples: int = 0
    throughput_bps: float = 0.0  # bytes per second, EWMA over large calls
    throughput_samples: int = 0
    calls: int = 0
    network_s: float = 0.0  # summed link share of every call timed
    bytes: int = 0  # summed bytes of those calls, both ways
    probe_latency_s: float | None = None
    probe_throughput_bps: float | None = None
    probed_at: float | None = None  # time.time() of the last probe

    def record(self, network_s: float, size: int) -> None:
        self.calls += 1
        self.network_s += network_s
        self.bytes += size
        if size <= SMALL_BYTES:
            self.latency_s = _ewma(self.latency_s, network_s, self.latency_samples)
            self.latency_samples += 1
            return
        transfer = network_s - self.latency()
        if transfer > 0.1 * network_s:  # else the size is lost in the latency's noise
            self.throughput_bps = _ewma(self.throughput_bps, size / transfer,
                                        self.throughput_samples)  # fmt: skip
            self.throughput_samples += 1

    def latency(self) -> float:
        if self.latency_samples:
            return self.latency_s
        return self.probe_latency_s or 0.0

    def throughput(self) -> float | None:
        if self.throughput_samples:
            return self.throughput_bps
        return self.probe_throughput_bps

    def known(self) -> bool:
        return bool(self.latency_samples or self.probe_latency_s is not None)

    def report(self) -> dict[str, Any]:
        throughput = self.throughput()
        return {
            "to": self.peer,
            "latency_s": round(self.latency(), 6) if self.known() else None,
            "throughput_bps": round(throughput) if throughput else None,
            "calls": self.calls,
            "network_s": round(self.network_s, 6),
            "bytes": self.bytes,
            "probe_latency_s": _round(self.probe_latency_s, 6),
            "probe_throughput_bps": _round(self.probe_throughput_bps, 0),
            "probed_at": _round(self.probed_at, 3),
        }


def _ewma(old: float, new: float, samples: int) -> float:
    return new if samples == 0 else old + ALPHA * (new - old)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class LinkTable:
    """This process's links, by peer base URL."""

    def __init__(self) -> None:
        self.links: dict[str, LinkStats] = {}

    def stats(self, peer: str) -> LinkStats:
        found = self.links.get(peer)
        if found is None:
            found = self.links[peer] = LinkStats(peer)
        return found

    def record(self, url: str, network_s: float, size: int) -> None:
        self.stats(peer_of(url)).record(max(0.0, network_s), size)

    def record_probe(self, url: str, latency_s: float, throughput_bps: float | None) -> None:
        link = self.stats(peer_of(url))
        link.probe_latency_s = latency_s
        link.probe_throughput_bps = throughput_bps
        link.probed_at = time.time()

    def report(self) -> list[dict[str, Any]]:
        return [link.report() for link in self.links.values()]


def measured(post: HopPost, links: LinkTable) -> HopPost:
    """``post`` that times every successful call and files its link share in ``links``."""

    async def send(url: str, headers: dict[str, str], body: bytes, timeout: float) -> HopAnswer:
        start = time.perf_counter()
        answer = await post(url, headers, body, timeout)
        took = time.perf_counter() - start
        server = server_seconds(answer)
        if answer.status == 200 and server is not None:
            links.record(url, took - server, len(body) + len(answer.body))
        return answer

    return send


async def probe(post: HopPost, peer: str, links: LinkTable, probe_bytes: int) -> None:
    """Time ``PROBE_ROUNDS`` empty calls (the least is the latency) and one of ``probe_bytes``
    (less that latency: the throughput); file them as the link's probe figures."""
    url = peer + PROBE_PATH
    rtts = []
    for _ in range(PROBE_ROUNDS):
        rtts.append(await _timed(post, url, b""))
    latency = min(rtts)
    throughput = None
    try:
        if probe_bytes > 0:
            transfer = await _timed(post, url, bytes(probe_bytes)) - latency
            throughput = probe_bytes / transfer if transfer > 0 else None
    finally:  # a peer refusing the large body (its max_body_bytes is smaller) keeps the latency
        links.record_probe(peer, latency, throughput)


async def _timed(post: HopPost, url: str, body: bytes) -> float:
    start = time.perf_counter()
    answer = await post(url, {"Content-Type": "application/octet-stream"}, body, 5.0)
    took = time.perf_counter() - start
    if answer.status != 200:
        raise ConnectionError(f"{url} answered {answer.status} to a link probe")
    return max(0.0, took - (server_seconds(answer) or 0.0))


class Prober:
    """Probes each peer it is told of once per ``interval_s``, one at a time in the
    background (joins come in bursts; probing them all at once would time each other)."""

    def __init__(self, run: Callable[[str], Awaitable[None]], interval_s: float) -> None:
        self._run = run
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._queue: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def want(self, peers: Iterable[str]) -> None:
        now = time.monotonic()
        for peer in peers:
            last = self._last.get(peer)
            if peer not in self._queue and (last is None or now - last >= self.interval_s):
                self._queue.append(peer)
        if self._queue and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue:
            peer = self._queue.pop(0)
            self._last[peer] = time.monotonic()
            try:
                await self._run(peer)
            except (
                OSError,
                TimeoutError,
                aiohttp.ClientError,
            ) as exc:  # figures come from traffic instead
                log.info("link probe to %s failed: %s", peer, exc or type(exc).__name__)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class LinkCollector(Collector):
    """The links of a process in /metrics, read from its table at scrape time."""

    def __init__(self, table: Callable[[], LinkTable | None]) -> None:
        self._table = table

    def collect(self) -> Iterable[Metric]:
        labels = ["peer"]
        network = CounterMetricFamily(
            "appliance_link_network_seconds",
            "summed link share of calls to a member (the caller's time less the callee's)",
            labels=labels,
        )
        calls = CounterMetricFamily(
            "appliance_link_calls", "calls to a member timed", labels=labels
        )
        sent = CounterMetricFamily(
            "appliance_link_bytes", "bytes of those calls, both ways", labels=labels
        )
        latency = GaugeMetricFamily(
            "appliance_link_latency_seconds",
            "a link's latency (EWMA, else its probe)",
            labels=labels,
        )
        throughput = GaugeMetricFamily(
            "appliance_link_throughput_bytes_per_second",
            "a link's throughput (EWMA over large calls, else its probe)",
            labels=labels,
        )
        table = self._table()
        for link in table.links.values() if table is not None else ():
            network.add_metric([link.peer], link.network_s)
            calls.add_metric([link.peer], link.calls)
            sent.add_metric([link.peer], link.bytes)
            if link.known():
                latency.add_metric([link.peer], link.latency())
            if (figure := link.throughput()) is not None:
                throughput.add_metric([link.peer], figure)
        yield from (network, calls, sent, latency, throughput)
