"""Calling the next span: pick a replica (p2c + EWMA), fail over to the others, eject the dead.

Used by the coordinator for the first span and by every node for the span after its own, so
both retry a failed hop the same way: on refusal, reset, 409 (other bytes), 503 or its share of
the deadline, the same tensors go to the next replica; a failed replica is ejected and let back
after a backoff (the next call to it is the probe), except on 409: that node is healthy, the
route was stale (a span unloaded or not loaded yet, as in a version switch). A hop slower than
its replica's recent p99 is hedged to the next replica (a pulled cable makes TCP hang, not
fail): the first good answer wins.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson

from appliance.errors import NoLiveReplica, UpstreamError
from appliance.ring import protocol as rp
from appliance.ring.balancer import (
    HedgeBudget,
    ReplicaStats,
    hedge_after,
    order_for_failover,
    record_latency,
)
from appliance.ring.hop_transport import HopAnswer, HopPost, HopTransportError
from runtime.deadline import Deadline

log = logging.getLogger(__name__)

RETRYABLE = {409, 502, 503, 504}


@dataclass
class _Ejection:
    until: float
    backoff_s: float


@dataclass(frozen=True)
class HopSettings:
    min_attempt_s: float = 1.0  # an attempt may always take this long (cold caches, big batches)
    latency_multiple: float = 10.0  # ...or this many times the replica's usual latency
    eject_s: float = 1.0  # first ejection; doubles on each failure in a row, up to max_eject_s
    max_eject_s: float = 30.0
    hedge_ratio: float = 0.1  # share of calls that may send a second copy (0: never hedge)
    hedge_floor_s: float = 0.02  # never hedge sooner than this, whatever the replica's p99


class HopClient:
    def __init__(
        self,
        post: HopPost,
        settings: HopSettings = HopSettings(),
        on_attempt: Callable[[str], None] | None = None,
        on_retry: Callable[[str], None] | None = None,
        on_eject: Callable[[str], None] | None = None,
        on_success: Callable[[str, float], None] | None = None,
        seed: int | None = None,
        on_hedge: Callable[[str], None] | None = None,
    ) -> None:
        self.post = post
        self.settings = settings
        self.stats: dict[rp.PeerUrl, ReplicaStats] = {}
        self.speeds: dict[str, float] = {}  # by URL, relative to the median node (coordinator)
        self.ejected: dict[str, _Ejection] = {}  # by PeerUrl
        self._rng = random.Random(seed)
        self._on_attempt = on_attempt or (lambda _: None)
        self._on_retry = on_retry or (lambda _: None)
        self._on_eject = on_eject or (lambda _: None)
        self._on_success = on_success or (lambda _url, _seconds: None)
        self._on_hedge = on_hedge or (lambda _: None)
        self.hedges = HedgeBudget(settings.hedge_ratio)

    def is_ejected(self, url: str) -> bool:
        ejection = self.ejected.get(url)
        return ejection is not None and ejection.until > time.monotonic()

    def eject(self, url: str, why: str) -> None:
        """Keep ``url`` out of routes for a while; each failure after a readmission doubles it
        (failures of calls already in flight when it was ejected do not count again)."""
        now = time.monotonic()
        previous = self.ejected.get(url)
        if previous is not None and previous.until > now:
            return
        backoff = (
            self.settings.eject_s
            if previous is None
            else min(previous.backoff_s * 2, self.settings.max_eject_s)
        )
        self.ejected[url] = _Ejection(now + backoff, backoff)
        log.warning("ejected %s for %.1fs: %s", url, backoff, why)
        self._on_eject(url)

    async def call(
        self,
        route: list[rp.RouteStep],
        model: str,
        digest: str,
        request_id: str,
        deadline: Deadline,
        body: bytes,
        header_length: int | None,
    ) -> tuple[bytes, int | None]:
        """Send ``body`` to a replica of ``route[0]`` with the rest of the route; its answer.

        A hop still unanswered past its replica's recent p99 is hedged: the same tensors go to
        the next replica too, the first good answer wins and the other is cancelled (a hop is
        a pure function of its body; at most ``hedge_ratio`` of calls hedge)."""
        step, rest = route[0], route[1:]
        stats = [self.stats.setdefault(url, ReplicaStats(url)) for url in step.replicas]
        for s in stats:
            s.speed = self.speeds.get(s.key, 1.0)
        live = [s for s in stats if not self.is_ejected(s.key)]
        # all ejected: trying them beats failing for sure (they may be back already)
        queue = order_for_failover(live or stats, self._rng)
        headers = rp.hop_headers(model, digest, step, request_id, deadline, rest, header_length)
        tried: list[str] = []
        running: dict[asyncio.Task[HopAnswer | Exception], _Attempt] = {}
        self.hedges.count_call()
        hedging, stop = self.settings.hedge_ratio > 0, False

        def start(hedge: bool) -> None:
            replica = queue.pop(0)
            left = deadline.remaining()
            # a hung replica (SIGSTOP, a dead host) must not eat the deadline of the others:
            # until the last candidate, an attempt gets its usual latency's multiple, or the floor
            usual = replica.ewma_latency_s * self.settings.latency_multiple
            timeout = left if not queue else min(left, max(self.settings.min_attempt_s, usual))
            if hedge:
                self._on_hedge(replica.key)
            elif tried:
                self._on_retry(replica.key)
            self._on_attempt(replica.key)
            tried.append(replica.key)
            attempt = _Attempt(replica, timeout, max(self.settings.min_attempt_s, usual),
                               time.perf_counter())  # fmt: skip
            running[asyncio.ensure_future(self._send(attempt, headers, body))] = attempt

        try:
            while running or (queue and not stop):
                if not running:
                    if deadline.remaining() <= 0:
                        break
                    start(hedge=False)
                wait_s = None
                if hedging and queue and not stop and len(running) == 1:
                    (only,) = running.values()
                    after = hedge_after(only.replica, self.settings.hedge_floor_s)
                    if after is not None:
                        wait_s = max(0.0, only.started + after - time.perf_counter())
                done, _ = await asyncio.wait(
                    running, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:  # slower than its p99: a copy to the next replica, if allowed
                    if self.hedges.take() and deadline.remaining() > 0:
                        start(hedge=True)
                    else:
                        hedging = False
                    continue
                for task in done:
                    attempt = running.pop(task)
                    answer = self._judge(attempt, task.result(), deadline)
                    if answer is not None:
                        # a hedged-away replica's wait so far is a lower bound of its latency:
                        # folded in, so the balancer sends it less until it answers again
                        now = time.perf_counter()
                        for loser in running.values():
                            record_latency(loser.replica, now - loser.started)
                        return answer
                    stop = stop or attempt.stop
        finally:
            for task in running:
                task.cancel()
        raise NoLiveReplica(
            f"no replica of span {step.span} of model {model} answered in time; tried "
            f"{', '.join(tried) or 'none (deadline passed)'}"
        )

    async def _send(
        self, attempt: _Attempt, headers: dict[str, str], body: bytes
    ) -> HopAnswer | Exception:
        replica = attempt.replica
        replica.outstanding += 1
        try:
            return await self.post(replica.key + "/internal/hop", headers, body, attempt.timeout)
        except (aiohttp.ClientError, HopTransportError, TimeoutError) as exc:
            return exc
        finally:
            replica.outstanding -= 1

    def _judge(
        self, attempt: _Attempt, outcome: HopAnswer | Exception, deadline: Deadline
    ) -> tuple[bytes, int | None] | None:
        """The answer to return, or None to go on (``attempt.stop``: try no other replica)."""
        url = attempt.replica.key
        if isinstance(outcome, Exception):
            if isinstance(outcome, TimeoutError) and attempt.timeout < attempt.fair:
                # the request's own deadline cut the attempt short: not the replica's
                # fault (a client sending tiny timeouts must not eject healthy nodes)
                attempt.stop = True
            else:
                self.eject(url, f"{type(outcome).__name__}: {outcome}")
            return None
        payload, status = outcome.body, outcome.status
        if status == 200:
            took = time.perf_counter() - attempt.started
            record_latency(attempt.replica, took)
            self._on_success(url, took)
            self.ejected.pop(url, None)
            length = outcome.headers.get(rp.HEADER_LENGTH.lower())
            return payload, int(length) if length is not None else None
        message = _error_text(payload, status)
        if status in RETRYABLE:
            if deadline.expired():
                attempt.stop = True  # the deadline ran out downstream: nobody to blame
            elif status != 409:  # 409: healthy, but not (or no longer) holding those bytes
                self.eject(url, f"{status}: {message}")
            return None
        raise UpstreamError(status, message)


@dataclass
class _Attempt:
    replica: ReplicaStats
    timeout: float
    fair: float  # what this replica deserves: below it, a timeout is the request's own
    started: float  # perf_counter
    stop: bool = False


def _error_text(payload: bytes, status: int) -> str:
    try:
        error = orjson.loads(payload).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    return str(error) if error else f"HTTP {status}"
