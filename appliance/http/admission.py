"""Admission of inference requests by the event loop's lag: overload answered 503 fast.

A server's one event loop reads every socket, parses every request and runs every hop. Past
its capacity the queue that grows is not one the server can see or bound (bytes waiting in
socket buffers, callbacks waiting for the loop); measured on 2 cores at 2x the coordinator's
capacity: every request, refused or served, waited seconds, and hops (one per 32 rows) left
once a second because each loop iteration parsed thousands of requests first.

So the lag of the loop (how late a 10 ms timer fires) governs how many inference requests may
be in flight. Once per 100 ms window the controller takes the window's second-largest lag
(one slow callback, a GC pass, is not a queue): after two windows in a row above
``overload_lag_ms`` (or one sample 8x above it) the limit is cut to 0.8x what is in flight,
never below ``min_limit`` (32) and never when no more than that is in flight (lag that other
work causes, another process on the same cores, is not cured by refusing inference); after
a calm window (below half the target) in which the limit was reached, it grows by 10 %.

The lag does not show a queue past the loop (on the nodes): so a window in which even the
fastest successful answer of one model (its path) took 8x that model's fastest of the last
30 s, and more than the target, cuts too, and one past half that does not grow the limit.
The limit starts at 64, so that a sudden overload does not queue thousands before the first
cut: a limit follows what is used, up to 4096. A request over the limit is refused before
its body is read or decoded: 503 with Retry-After, answered from its bytes when it came
whole (``fast_refusal``); a request under it reads its body before it counts in flight (a
trickling body is the connection tracker's to end). Only ``POST .../infer`` is governed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from runtime.errors import Overloaded

_TICK_S = 0.01  # the lag monitor's timer
_WINDOW_S = 0.1  # the controller decides once per window, on the window's samples
_CUT = 0.8  # the limit after a cut, as a fraction of what was in flight
_GROW = 1.1  # per calm window (x2.6 a second)
_HOLD_S = 0.3  # no growth this soon after a cut: its effect shows first
_START = 64  # a limit starts here and grows while it is reached and the loop is calm: a
# limit far above what the loop can serve would let a sudden overload queue that much first
_IN_USE = 0.8  # a window whose peak in flight reached 0.8x the limit: the limit is in use
_STANDING = 2  # windows in a row above the target: a queue, not a stall of another process
_FAR_BEHIND = 8  # one sample this many times the target: cut at once
# A window in which even the fastest request answered took this many times the fastest of
# the last _FLOOR_S (and more than the lag target) has a standing queue past the loop (in the
# ring: the nodes' batchers), which the lag does not show: measured on 2 cores at 2x the
# capacity, the loop lagged little while admitted requests waited 0.2-6 s on the node. So it
# cuts too (a sojourn-time rule, as CoDel's: the minimum, since one slow request is not a
# queue; relative, since a model whose every answer takes 300 ms has no queue at 300 ms).
# 8, not less: a batch of 32 answers later than one row, and at 4 the 2x run held the limit
# at min_limit and admitted 0.65x the capacity; at 8, 1.04-1.18x with p99 2.1-2.9x half load.
_QUEUE_FACTOR = 8
_FLOOR_S = 30  # the floor: the fastest answer of so many seconds (long enough to span a surge)


def governed(method: str, path: str) -> bool:
    """Whether a request is an inference request, the ones admission limits. Generation
    (long-lived streams, with their own KV budget) is left to its own admission for now."""
    return method == "POST" and path.startswith("/v2/models/") and path.endswith("/infer")


class AnswerFloors:
    """Per key (a model's path), the fastest answer of the current window and of each second
    of the last _FLOOR_S: the floor is what an answer costs with no queue, measured."""

    def __init__(self) -> None:
        self._window: dict[str, float] = {}
        self._seconds: dict[str, collections.deque[tuple[int, float]]] = {}

    def add(self, key: str, seconds: float) -> None:
        if seconds < self._window.get(key, float("inf")):
            self._window[key] = seconds

    def floor(self, key: str) -> float:
        return min((fastest for _, fastest in self._seconds.get(key, ())), default=0.0)

    def close_window(self, now: float) -> tuple[float, float] | None:
        """The window's (fastest, floor) of the key furthest above its floor, then a new
        window; None for a window with no answer (it says nothing: the lag speaks for
        stalls). A key unanswered for _FLOOR_S is forgotten."""
        second = int(now)
        for key, fastest in self._window.items():
            slots = self._seconds.setdefault(key, collections.deque())
            if slots and slots[-1][0] == second:
                slots[-1] = (second, min(fastest, slots[-1][1]))
            else:
                slots.append((second, fastest))
        for key in list(self._seconds):
            slots = self._seconds[key]
            while slots and slots[0][0] <= second - _FLOOR_S:
                slots.popleft()
            if not slots:
                del self._seconds[key]
        behind = max(
            self._window.items(), key=lambda kv: kv[1] / max(self.floor(kv[0]), 1e-9), default=None
        )
        self._window.clear()
        return None if behind is None else (behind[1], self.floor(behind[0]))


class Admission:
    def __init__(
        self,
        lag_target_s: float,
        max_limit: int = 4096,
        min_limit: int = 32,
        start_limit: int = _START,
    ) -> None:
        self.lag_target_s = lag_target_s
        self.max_limit = max_limit
        self.min_limit = min_limit
        self.limit = float(min(start_limit, max_limit))
        self.in_flight = 0
        self.peak = 0  # the most in flight in the current window
        self.refused = 0
        self.cuts = 0
        self.lag_s = 0.0  # the last sample
        self.lag_max_s = 0.0  # the largest since the last scrape
        self.lag_recent_s = 0.0  # decays by half a second: what a connection may wait on
        self._window: list[float] = []
        self.answers = AnswerFloors()
        self.fastest_s = 0.0  # of the last window with answers, for the model most behind
        self.floor_s = 0.0  # and that model's floor
        self._above = 0  # windows in a row above the target
        self._window_start = -float("inf")
        self._cut_at = -float("inf")
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.lag_target_s > 0

    def over_limit(self) -> bool:
        if self.in_flight >= self.limit:
            self.refused += 1
            return True
        return False

    def enter(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.peak:
            self.peak = self.in_flight

    def release(self, seconds: float | None = None, key: str = "") -> None:
        """One request done; ``seconds`` for one answered as asked (2xx), by ``key`` (its
        path: the queue rule compares a model's answers with its own)."""
        self.in_flight -= 1
        if seconds is not None:
            self.answers.add(key, seconds)

    def observe(self, lag_s: float, now: float) -> None:
        """One sample of the loop's lag: the controller's only input."""
        self.lag_s = lag_s
        self.lag_max_s = max(self.lag_max_s, lag_s)
        self.lag_recent_s = max(lag_s, self.lag_recent_s * 0.98)
        if not self.enabled:
            return
        self._window.append(lag_s)
        if lag_s > _FAR_BEHIND * self.lag_target_s:
            self._cut(now, lag_s)  # far behind: no need to wait for the windows
        if now - self._window_start < _WINDOW_S:
            return
        # the second-largest sample: one slow callback (a GC pass, a sweep) is not a queue
        ordered = sorted(self._window)
        level = ordered[-2] if len(ordered) > 1 else ordered[-1]
        self._window.clear()
        self._window_start = now
        self._above = self._above + 1 if level > self.lag_target_s else 0
        answered = self.answers.close_window(now)
        if answered is not None:
            self.fastest_s, self.floor_s = answered
        fastest, floor = answered or (0.0, 0.0)
        queue = max(_QUEUE_FACTOR * floor, self.lag_target_s)  # a fastest this slow
        if self._above >= _STANDING or fastest > queue:
            self._cut(now, level)
        elif level < self.lag_target_s / 2 and now - self._cut_at >= _HOLD_S:
            # grow only a limit that is reached, and not while answers slow towards a queue
            grow = self.peak >= _IN_USE * self.limit and not fastest > queue / 2
            self.limit = min(float(self.max_limit), self.limit * _GROW + 1) if grow else self.limit
        self.peak = self.in_flight

    def _cut(self, now: float, lag_s: float) -> None:
        # only when inference fills the loop (cutting a few requests helps nothing), and at
        # most once per window, or per lag when it is longer: a cut takes that long to show
        if self.in_flight <= self.min_limit or now - self._cut_at < max(lag_s, _WINDOW_S):
            return
        self.limit = max(self.min_limit, min(self.limit, self.in_flight) * _CUT)
        self._cut_at = now
        self.cuts += 1

    def start(self) -> None:
        """The lag monitor runs even with admission off: the tracker reads the lag too."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + _TICK_S
            await asyncio.sleep(_TICK_S)
            now = loop.time()
            self.observe(max(0.0, now - due), time.monotonic())


def admission_middleware(admission: Admission, max_body_bytes: int) -> Middleware:
    """Refuse past the limit before reading anything more; else read the body, uncounted (a
    body that trickles is the connection tracker's to end, and must not take the places of
    requests that are complete), then count the request in flight while it is served."""

    def refuse() -> Overloaded:
        return Overloaded(
            f"this server is overloaded (its event loop is {admission.lag_s * 1000:.0f} ms "
            f"behind, {admission.in_flight} requests in flight); retry later"
        )

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not admission.enabled or not governed(request.method, request.path):
            return await handler(request)
        if admission.over_limit():
            raise refuse()
        declared = request.content_length
        too_large = declared is not None and declared > max_body_bytes  # the handler's 413
        if not request.content.is_eof() and not too_large:
            await request.read()  # kept by aiohttp: the handler reads the same bytes
            if admission.over_limit():
                raise refuse()
        admission.enter()
        started = time.monotonic()
        answered: float | None = None
        try:
            response = await handler(request)
            if response.status < 300:  # errors and refusals say nothing of the queue
                answered = time.monotonic() - started
            return response
        finally:
            admission.release(answered, request.path)

    return middleware
