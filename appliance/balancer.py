"""Choosing a replica: power of two choices weighted by EWMA latency (as petals and linkerd)."""

from __future__ import annotations

import random
import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass
class ReplicaStats:
    node_id: str
    outstanding: int = 0
    ewma_latency_s: float = 0.0  # 0 = no sample yet
    samples: int = 0


def record_latency(stats: ReplicaStats, seconds: float, alpha: float = 0.3) -> None:
    if stats.samples == 0:
        stats.ewma_latency_s = seconds
    else:
        stats.ewma_latency_s = alpha * seconds + (1 - alpha) * stats.ewma_latency_s
    stats.samples += 1


def score(stats: ReplicaStats, default_latency_s: float) -> float:
    latency = stats.ewma_latency_s if stats.samples else default_latency_s
    return (stats.outstanding + 1) * latency


def _default_latency(candidates: Sequence[ReplicaStats]) -> float:
    known = [c.ewma_latency_s for c in candidates if c.samples]
    return statistics.median(known) if known else 1.0


def pick(
    candidates: Sequence[ReplicaStats], rng: random.Random, exclude: Collection[str] = ()
) -> ReplicaStats | None:
    pool = [c for c in candidates if c.node_id not in exclude]
    if len(pool) <= 1:
        return pool[0] if pool else None
    default = _default_latency(pool)
    a, b = rng.sample(pool, 2)
    return a if score(a, default) <= score(b, default) else b


def order_for_failover(
    candidates: Sequence[ReplicaStats], rng: random.Random, exclude: Collection[str] = ()
) -> list[ReplicaStats]:
    first = pick(candidates, rng, exclude)
    if first is None:
        return []
    default = _default_latency(candidates)
    rest = sorted(
        (c for c in candidates if c is not first and c.node_id not in exclude),
        key=lambda c: score(c, default),
    )
    return [first, *rest]
