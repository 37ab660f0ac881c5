"""Replica choice: p2c on EWMA latency shuns slow replicas, tries new ones, honours exclude."""

from __future__ import annotations

import heapq
import random

import pytest

from appliance.ring.balancer import (
    ReplicaStats,
    default_latency,
    order_for_failover,
    pick,
    record_latency,
    score,
)


def simulate(service_s: list[float], requests: int, interval_s: float, seed: int) -> list[int]:
    """Requests arriving every `interval_s` at single-server FIFO replicas whose service time is
    drawn around `service_s[i]`; each pick sees the outstanding counts and EWMAs of requests
    finished so far. Returns how many requests each replica got."""
    rng = random.Random(seed)
    replicas = [ReplicaStats(f"r{i}") for i in range(len(service_s))]
    busy_until = [0.0] * len(replicas)
    finishing: list[tuple[float, int, float]] = []  # (finish time, replica, latency)
    counts = [0] * len(replicas)
    for n in range(requests):
        now = n * interval_s
        while finishing and finishing[0][0] <= now:
            _, i, latency = heapq.heappop(finishing)
            replicas[i].outstanding -= 1
            record_latency(replicas[i], latency)
        chosen = pick(replicas, rng)
        assert chosen is not None
        i = replicas.index(chosen)
        counts[i] += 1
        chosen.outstanding += 1
        start = max(now, busy_until[i])
        busy_until[i] = start + service_s[i] * rng.uniform(0.5, 1.5)
        heapq.heappush(finishing, (busy_until[i], i, busy_until[i] - now))
    return counts


@pytest.mark.parametrize("load", [0.6, 0.9])
@pytest.mark.parametrize("fast", [1, 2])
def test_a_five_times_slower_replica_gets_under_a_quarter_of_the_traffic(
    fast: int, load: float
) -> None:
    # Fast replicas serve 100/s each, the slow one 20/s; `load` is the share of that offered.
    service = [0.01] * fast + [0.05]
    capacity = fast * 100 + 20
    counts = simulate(service, 10_000, 1 / (load * capacity), seed=fast)
    share = counts[-1] / sum(counts)
    assert share < 0.25, counts
    assert all(c > 1_000 for c in counts[:-1])
    if load > 0.8:
        assert share > 0.02, counts  # once the fast ones queue up, it takes its part


def test_deterministic_with_a_seeded_rng() -> None:
    service = [0.01, 0.02, 0.05]
    assert simulate(service, 2_000, 0.01, seed=5) == simulate(service, 2_000, 0.01, seed=5)


def test_exclude_is_honoured() -> None:
    replicas = [ReplicaStats(n) for n in "abc"]
    rng = random.Random(1)
    for _ in range(200):
        chosen = pick(replicas, rng, exclude={"a"})
        assert chosen is not None and chosen.key != "a"
    assert pick(replicas, rng, exclude={"a", "b"}) is replicas[2]
    assert pick(replicas, rng, exclude={"a", "b", "c"}) is None
    assert pick([], rng) is None
    assert pick(replicas[:1], rng) is replicas[0]


def test_a_new_replica_gets_tried() -> None:
    known = [ReplicaStats("a"), ReplicaStats("b")]
    record_latency(known[0], 0.1)
    record_latency(known[1], 0.2)
    new = ReplicaStats("new")
    rng = random.Random(2)
    picks = [pick([*known, new], rng) for _ in range(1_000)]
    tried = sum(p is new for p in picks)
    # It scores the median (0.15): it wins every draw against b, none against a.
    assert 200 < tried < 500
    assert default_latency([*known, new]) == pytest.approx(0.15)


def test_with_no_samples_anywhere_the_least_loaded_wins() -> None:
    idle, busy = ReplicaStats("idle"), ReplicaStats("busy", outstanding=3)
    rng = random.Random(3)
    assert all(pick([busy, idle], rng) is idle for _ in range(50))


def test_record_latency_is_an_ewma_that_starts_at_the_first_sample() -> None:
    stats = ReplicaStats("a")
    record_latency(stats, 1.0)
    assert (stats.ewma_latency_s, stats.samples) == (1.0, 1)
    record_latency(stats, 2.0)
    assert stats.ewma_latency_s == pytest.approx(1.3)
    record_latency(stats, 0.0, alpha=1.0)
    assert (stats.ewma_latency_s, stats.samples) == (0.0, 3)
    with pytest.raises(ValueError, match="latency -1.0"):
        record_latency(stats, -1.0)
    with pytest.raises(ValueError, match="alpha 0"):
        record_latency(stats, 1.0, alpha=0)


def test_score_weights_latency_by_queue_length() -> None:
    stats = ReplicaStats("a", outstanding=2)
    assert score(stats, 0.5) == pytest.approx(1.5)  # no sample: the default latency
    record_latency(stats, 0.1)
    assert score(stats, 0.5) == pytest.approx(0.3)


def test_failover_order_is_the_pick_then_the_rest_by_score() -> None:
    replicas = [ReplicaStats(n) for n in "abcd"]
    for stats, latency in zip(replicas, [0.4, 0.1, 0.3, 0.2], strict=True):
        record_latency(stats, latency)
    for seed in range(20):
        order = order_for_failover(replicas, random.Random(seed), exclude={"d"})
        assert order[0] is pick(replicas, random.Random(seed), exclude={"d"})
        assert sorted(s.key for s in order) == ["a", "b", "c"]
        rest = [s.ewma_latency_s for s in order[1:]]
        assert rest == sorted(rest)
    assert order_for_failover(replicas, random.Random(0), exclude="abcd") == []
