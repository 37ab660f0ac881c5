"""Calling the next span: pick a replica (p2c + EWMA), fail over to the others, eject the dead.

Used by the coordinator for the first span and by every node for the span after its own, so
both retry a failed hop the same way: on refusal, reset, 409 (other bytes), 503 or its share of
the deadline, the same tensors go to the next replica; a failed replica is ejected and let back
after a backoff (the next call to it is the probe), except on 409: that node is healthy, the
route was stale (a span unloaded or not loaded yet, as in a version switch).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson

from appliance.errors import NoLiveReplica, UpstreamError
from appliance.ring import protocol as rp
from appliance.ring.balancer import ReplicaStats, order_for_failover, record_latency
from appliance.ring.hop_transport import HopPost, HopTransportError
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
        """Send ``body`` to a replica of ``route[0]`` with the rest of the route; its answer."""
        step, rest = route[0], route[1:]
        stats = [self.stats.setdefault(url, ReplicaStats(url)) for url in step.replicas]
        for s in stats:
            s.speed = self.speeds.get(s.key, 1.0)
        live = [s for s in stats if not self.is_ejected(s.key)]
        # all ejected: trying them beats failing for sure (they may be back already)
        ordered = order_for_failover(live or stats, self._rng)
        headers = rp.hop_headers(model, digest, step, request_id, deadline, rest, header_length)
        tried: list[str] = []
        for index, replica in enumerate(ordered):
            left = deadline.remaining()
            if left <= 0:
                break
            if index:
                self._on_retry(replica.key)
            # a hung replica (SIGSTOP, a dead host) must not eat the deadline of the others:
            # until the last candidate, an attempt gets its usual latency's multiple, or the floor
            usual = replica.ewma_latency_s * self.settings.latency_multiple
            last_chance = index == len(ordered) - 1
            timeout = left if last_chance else min(left, max(self.settings.min_attempt_s, usual))
            url = replica.key
            tried.append(url)
            self._on_attempt(url)
            replica.outstanding += 1
            started = time.perf_counter()
            try:
                answer = await self.post(url + "/internal/hop", headers, body, timeout)
                payload, status = answer.body, answer.status
                length = answer.headers.get(rp.HEADER_LENGTH.lower())
            except (aiohttp.ClientError, HopTransportError, TimeoutError) as exc:
                fair = max(self.settings.min_attempt_s, usual)
                if isinstance(exc, TimeoutError) and timeout < fair:
                    # the request's own deadline cut the attempt short: not the replica's
                    # fault (a client sending tiny timeouts must not eject healthy nodes)
                    break
                self.eject(url, f"{type(exc).__name__}: {exc}")
                continue
            finally:
                replica.outstanding -= 1
            if status == 200:
                took = time.perf_counter() - started
                record_latency(replica, took)
                self._on_success(url, took)
                self.ejected.pop(url, None)
                return payload, int(length) if length is not None else None
            message = _error_text(payload, status)
            if status in RETRYABLE:
                if deadline.expired():
                    break  # the deadline ran out downstream: nothing to blame this replica for
                if status != 409:  # 409: healthy, but not (or no longer) holding those bytes
                    self.eject(url, f"{status}: {message}")
                continue
            raise UpstreamError(status, message)
        raise NoLiveReplica(
            f"no replica of span {step.span} of model {model} answered in time; tried "
            f"{', '.join(tried) or 'none (deadline passed)'}"
        )


def _error_text(payload: bytes, status: int) -> str:
    try:
        error = orjson.loads(payload).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    return str(error) if error else f"HTTP {status}"
