"""Replica choice: power of two choices weighted by EWMA latency (as linkerd and petals do).

Pure functions over plain data. The caller keeps one `ReplicaStats` per replica, bumps
`outstanding` around each call, feeds `record_latency` with what it measured, and asks `pick`
(or `order_for_failover`, for the order to try replicas in when a hop fails). Sampling two at
random rather than taking the global best keeps a burst from piling onto one replica whose
figures are stale; weighting by latency sends little traffic to a slow one.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

DEFAULT_ALPHA = 0.3
# The latency assumed when no replica has a sample yet: any positive value works, since then
# every replica scores by its outstanding count alone.
_NO_SAMPLES_LATENCY_S = 1.0
RECENT = 100  # latencies kept per replica for its p99 (when to hedge a hop)


@dataclass
class ReplicaStats:
    """One replica's load figures, mutable and owned by the caller."""

    key: str  # what names the replica to its caller (the hop client: its URL)
    outstanding: int = 0
    ewma_latency_s: float = 0.0  # meaningless while samples == 0
    samples: int = 0
    speed: float = 1.0  # measured speed relative to the median node's (until it has samples)
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))


def record_latency(stats: ReplicaStats, seconds: float, alpha: float = DEFAULT_ALPHA) -> None:
    """Fold one measured latency into the replica's EWMA (the first sample is taken as is)."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"latency {seconds!r}: a finite number of seconds >= 0")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha {alpha!r}: the EWMA weight of a new sample, in (0, 1]")
    if stats.samples == 0:
        stats.ewma_latency_s = seconds
    else:
        stats.ewma_latency_s += alpha * (seconds - stats.ewma_latency_s)
    stats.samples += 1
    stats.recent.append(seconds)


def hedge_after(stats: ReplicaStats, floor_s: float, min_samples: int = 20) -> float | None:
    """When a hop to this replica, still unanswered, gets a copy sent to another replica: its
    recent p99 (of the last RECENT answers), never under ``floor_s``; None (no hedge) before
    it has ``min_samples`` answers to know its p99 from."""
    if len(stats.recent) < min_samples:
        return None
    ordered = sorted(stats.recent)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return max(floor_s, p99)


class HedgeBudget:
    """At most ``ratio`` of calls (plus ``burst``) get a hedge: a ring where every hop is slow
    (overloaded, not one replica stuck) must not be sent its work twice. Counts halve every
    ``window`` calls, so the budget follows the recent traffic."""

    def __init__(self, ratio: float = 0.1, burst: int = 5, window: int = 1000) -> None:
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio {ratio!r}: the share of calls that may hedge, in [0, 1]")
        self.ratio, self.burst, self.window = ratio, burst, window
        self.calls = 0.0
        self.hedges = 0.0

    def count_call(self) -> None:
        self.calls += 1
        if self.calls >= self.window:
            self.calls /= 2
            self.hedges /= 2

    def take(self) -> bool:
        """Whether one more hedge is allowed now (it is counted if so)."""
        if self.hedges >= self.ratio * self.calls + self.burst:
            return False
        self.hedges += 1
        return True


def score(stats: ReplicaStats, default_latency_s: float) -> float:
    """Expected wait on this replica: (outstanding + 1) x latency; lower is better.

    A replica without samples gets `default_latency_s` (typically the median of the known ones)
    divided by its measured speed, so that it is neither shunned nor flooded until it has
    figures of its own, and a faster node takes more of that first traffic.
    """
    speed = stats.speed if math.isfinite(stats.speed) and stats.speed > 0 else 1.0
    latency = stats.ewma_latency_s if stats.samples else default_latency_s / speed
    return (max(stats.outstanding, 0) + 1) * latency


def default_latency(candidates: Sequence[ReplicaStats]) -> float:
    """The latency assumed for replicas without samples: the median of the known ones."""
    known = [c.ewma_latency_s for c in candidates if c.samples]
    return statistics.median(known) if known else _NO_SAMPLES_LATENCY_S


def pick(
    candidates: Sequence[ReplicaStats],
    rng: random.Random,
    exclude: Collection[str] = (),
) -> ReplicaStats | None:
    """Two distinct random candidates not in `exclude`, the one with the lower score; the only
    one if one is left; None if none is."""
    eligible = [c for c in candidates if c.key not in exclude]
    if len(eligible) <= 1:
        return eligible[0] if eligible else None
    default = default_latency(candidates)
    first, second = rng.sample(range(len(eligible)), 2)
    a, b = eligible[first], eligible[second]
    # Ties go to the first drawn, which is itself random: no bias towards list order.
    return b if score(b, default) < score(a, default) else a


def order_for_failover(
    candidates: Sequence[ReplicaStats],
    rng: random.Random,
    exclude: Collection[str] = (),
) -> list[ReplicaStats]:
    """The order a caller tries replicas in: `pick`'s choice first, then the rest (excluded ones
    left out) by score, list order breaking ties."""
    chosen = pick(candidates, rng, exclude)
    if chosen is None:
        return []
    default = default_latency(candidates)
    rest = [c for c in candidates if c.key not in exclude and c is not chosen]
    rest.sort(key=lambda c: score(c, default))  # stable: equal scores keep list order
    return [chosen, *rest]
