"""place(): optimal spans against a brute force, ring and speed preferences, clear refusals."""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Sequence
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.coordinator.placement import (
    NodeCapacity,
    Placement,
    PlacementError,
    SpanAssignment,
    place,
    span_need,
)

GiB = 2**30


def nodes_of(*budgets: int, speeds: Sequence[float] = ()) -> list[NodeCapacity]:
    names = "abcdefghijklmnop"
    return [
        NodeCapacity(names[i], b, speeds[i] if speeds else 1.0, ring_index=i)
        for i, b in enumerate(budgets)
    ]


def check_valid(
    placement: Placement,
    sizes: Sequence[int],
    nodes: Sequence[NodeCapacity],
    replicas: int,
    overhead: float,
    fixed: int,
) -> None:
    """Contiguous spans covering every segment, distinct replicas, nobody over budget."""
    spans = placement.spans
    assert [s.span for s in spans] == list(range(len(spans)))
    assert spans[0].first == 0 and spans[-1].last == len(sizes) - 1
    for before, after in itertools.pairwise(spans):
        assert after.first == before.last + 1
    used = {n.node_id: 0 for n in nodes}
    for s in spans:
        assert s.first <= s.last
        assert s.bytes == sum(sizes[s.first : s.last + 1])
        assert len(s.replicas) == replicas == len(set(s.replicas))
        for node_id in s.replicas:
            used[node_id] += span_need(s.bytes, overhead, fixed)
    for n in nodes:
        assert used[n.node_id] <= n.memory_budget, (n, used)


def brute_force(
    sizes: Sequence[int], budgets: Sequence[int], replicas: int, overhead: float, fixed: int
) -> dict[int, int]:
    """Span count K -> the smallest largest-span bytes of any feasible placement with K spans,
    by trying every contiguous split and every assignment of spans to distinct nodes."""

    @cache
    def assignable(needs: tuple[int, ...]) -> bool:
        free = list(budgets)

        def go(s: int) -> bool:
            if s == len(needs):
                return True
            for combo in itertools.combinations(range(len(free)), replicas):
                if all(free[q] >= needs[s] for q in combo):
                    for q in combo:
                        free[q] -= needs[s]
                    ok = go(s + 1)
                    for q in combo:
                        free[q] += needs[s]
                    if ok:
                        return True
            return False

        return go(0)

    n = len(sizes)
    best: dict[int, int] = {}
    for k in range(1, n + 1):
        splits = []
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0, *cuts, n)
            spans = [sum(sizes[a:b]) for a, b in itertools.pairwise(bounds)]
            splits.append((max(spans), spans))
        for largest, spans in sorted(splits):
            needs = tuple(sorted((span_need(b, overhead, fixed) for b in spans), reverse=True))
            if assignable(needs):
                best[k] = largest
                break
    return best


cases = st.fixed_dictionaries(
    {
        "sizes": st.lists(st.integers(0, 100), min_size=1, max_size=7),
        "budgets": st.lists(st.integers(0, 320), min_size=1, max_size=4),
        "replicas": st.integers(1, 2),
        "overhead": st.sampled_from([1.0, 1.15, 1.5]),
        "fixed": st.sampled_from([0, 10, 25]),
        "stages_seed": st.integers(0, 10**6),
    }
)


@settings(max_examples=250, deadline=None, derandomize=True)
@given(cases)
def test_place_matches_the_brute_force(case: dict[str, Any]) -> None:
    sizes, budgets, replicas = case["sizes"], case["budgets"], case["replicas"]
    overhead, fixed = case["overhead"], case["fixed"]
    nodes = nodes_of(*budgets)
    optimum = brute_force(sizes, budgets, replicas, overhead, fixed)
    kwargs: dict[str, Any] = {"replicas": replicas, "overhead": overhead, "fixed_overhead": fixed}

    # Fewest spans that fit, then the smallest largest span for that count.
    if replicas > len(nodes) or not optimum:
        with pytest.raises(PlacementError):
            place(sizes, nodes, **kwargs)
    else:
        placement = place(sizes, nodes, **kwargs)
        check_valid(placement, sizes, nodes, replicas, overhead, fixed)
        k = min(optimum)
        assert len(placement.spans) == k
        assert max(s.bytes for s in placement.spans) == optimum[k]

    # A given span count: feasible exactly when the brute force says so, with its optimum.
    stages = case["stages_seed"] % len(sizes) + 1
    if replicas > len(nodes) or stages not in optimum:
        with pytest.raises(PlacementError):
            place(sizes, nodes, stages=stages, **kwargs)
    else:
        placement = place(sizes, nodes, stages=stages, **kwargs)
        check_valid(placement, sizes, nodes, replicas, overhead, fixed)
        assert len(placement.spans) == stages
        assert max(s.bytes for s in placement.spans) == optimum[stages]


def test_every_span_count_against_the_brute_force_on_random_clusters() -> None:
    rng = random.Random(7)
    checked = 0
    for _ in range(150):
        sizes = [rng.randint(1, 60) for _ in range(rng.randint(3, 7))]
        budgets = [rng.randint(20, 200) for _ in range(rng.randint(2, 4))]
        replicas = rng.randint(1, min(2, len(budgets)))
        optimum = brute_force(sizes, budgets, replicas, 1.0, 5)
        nodes = nodes_of(*budgets)
        for k in range(1, len(sizes) + 1):
            kwargs: dict[str, Any] = {
                "stages": k,
                "replicas": replicas,
                "overhead": 1.0,
                "fixed_overhead": 5,
            }
            if k in optimum:
                placement = place(sizes, nodes, **kwargs)
                check_valid(placement, sizes, nodes, replicas, 1.0, 5)
                assert max(s.bytes for s in placement.spans) == optimum[k]
                checked += 1
            else:
                with pytest.raises(PlacementError):
                    place(sizes, nodes, **kwargs)
    assert checked > 100  # the cases are not all refusals


def test_span_need_reads_the_overhead_as_the_decimal_written() -> None:
    assert span_need(20, 1.15, 0) == 23  # not 22.999... rounded up to 23 by luck
    assert span_need(GiB) == -(-23 * GiB // 20) + 150 * 2**20  # the defaults
    assert span_need(1, 1.15, 7) == 9


def test_one_big_node_takes_everything() -> None:
    nodes = [
        NodeCapacity("small", 2 * GiB, ring_index=0),
        NodeCapacity("big", 64 * GiB, ring_index=1),
    ]
    placement = place([GiB] * 8, nodes)
    assert placement.spans == (SpanAssignment(0, 0, 7, 8 * GiB, ("big",)),)


def test_the_fewest_spans_that_fit() -> None:
    # 4 GiB of weights; a node of 2 GiB holds at most 1.6 GiB of segments (1.15 x bytes +
    # 150 MiB), so three segments of 0.5 GiB: two such nodes are not enough, three are.
    sizes = [GiB // 2] * 8
    assert len(place(sizes, nodes_of(2 * GiB, 2 * GiB, 2 * GiB)).spans) == 3
    assert len(place(sizes, nodes_of(2 * GiB, 4 * GiB)).spans) == 2
    assert len(place(sizes, nodes_of(8 * GiB)).spans) == 1
    with pytest.raises(PlacementError):
        place(sizes, nodes_of(2 * GiB, 2 * GiB))


def test_consecutive_spans_go_to_ring_neighbours() -> None:
    # Listed out of ring order, ids unrelated to it: only ring_index may decide.
    nodes = [
        NodeCapacity("x", 10 * GiB, ring_index=2),
        NodeCapacity("y", 10 * GiB, ring_index=0),
        NodeCapacity("z", 10 * GiB, ring_index=1),
    ]
    placement = place([GiB] * 6, nodes, stages=3)
    assert [s.replicas for s in placement.spans] == [("y",), ("z",), ("x",)]
    assert [(s.first, s.last) for s in placement.spans] == [(0, 1), (2, 3), (4, 5)]

    # With 2 replicas each preference rank walks the ring too.
    placement = place([GiB] * 6, nodes, stages=3, replicas=2)
    ring = ["y", "z", "x"]
    for before, after in itertools.pairwise(placement.spans):
        for q in range(2):
            assert ring.index(after.replicas[q]) == (ring.index(before.replicas[q]) + 1) % 3


def test_heavier_spans_go_to_faster_nodes() -> None:
    nodes = nodes_of(10 * GiB, 10 * GiB, speeds=[1.0, 2.0])
    placement = place([3 * GiB, GiB], nodes, stages=2)
    assert [s.replicas for s in placement.spans] == [("b",), ("a",)]
    placement = place([GiB, 3 * GiB], nodes, stages=2)
    assert [s.replicas for s in placement.spans] == [("a",), ("b",)]


def test_a_node_may_hold_several_spans_but_never_two_replicas_of_one() -> None:
    nodes = nodes_of(100, 100)
    placement = place([10] * 4, nodes, stages=4, replicas=2, overhead=1.0, fixed_overhead=0)
    assert placement.node_spans() == {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}
    assert all(sorted(s.replicas) == ["a", "b"] for s in placement.spans)


def test_a_span_too_big_for_any_node_is_named() -> None:
    nodes = nodes_of(2 * GiB, 4 * GiB)
    with pytest.raises(PlacementError) as info:
        place([GiB] * 4, nodes, stages=1)
    message = str(info.value)
    assert "segments 0-3 need 4.7 GiB (with overhead)" in message
    assert "largest free budget 4.0 GiB on node b" in message


def test_a_packing_shortfall_names_segments_bytes_and_node() -> None:
    # 18 bytes fit 20 bytes of budget in total, but no split packs into two nodes of 10.
    with pytest.raises(PlacementError) as info:
        place([6, 6, 6], nodes_of(10, 10), overhead=1.0, fixed_overhead=0)
    message = str(info.value)
    assert "segments 0-1 need 12 B (with overhead)" in message
    assert "largest free budget 10 B on node a" in message


def test_too_few_nodes_for_the_replicas_of_a_segment() -> None:
    with pytest.raises(PlacementError) as info:
        place([GiB] * 4, nodes_of(3 * GiB, GiB, GiB), replicas=2)
    message = str(info.value)
    assert "2 replicas asked but only 1 node(s) can hold segment 0 (1.3 GiB with overhead)" in (
        message
    )
    assert message.endswith(": a")


def test_too_little_memory_in_total() -> None:
    with pytest.raises(PlacementError, match=r"need 9\.8 GiB in all .* budgets total 6\.0 GiB"):
        place([GiB] * 8, nodes_of(3 * GiB, 3 * GiB))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"segment_bytes": []}, "segment_bytes is empty"),
        ({"segment_bytes": [1, -1]}, r"segment_bytes\[1\] = -1: .* integers >= 0"),
        ({"nodes": []}, "at least one node"),
        ({"replicas": 0}, "replicas 0: at least 1"),
        ({"replicas": 3}, "3 replicas asked but the ring has only 2 node"),
        ({"stages": 0}, "stages 0 with 2 segment.*between 1 and the segment count"),
        ({"stages": 3}, "stages 3 with 2 segment"),
        ({"overhead": 0.5}, "overhead 0.5: a finite number >= 1.0"),
        ({"fixed_overhead": -1}, "fixed_overhead -1"),
        (
            {"nodes": [NodeCapacity("a", 10), NodeCapacity("a", 20, ring_index=1)]},
            "duplicate node ids: a",
        ),
        ({"nodes": [NodeCapacity("a", -5)]}, "node a: memory_budget -5"),
        ({"nodes": [NodeCapacity("a", 5, throughput=0.0)]}, "node a: throughput 0.0"),
    ],
)
def test_invalid_requests_are_refused(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"segment_bytes": [1, 2], "nodes": nodes_of(100, 100)}
    args.update(kwargs)
    with pytest.raises(PlacementError, match=match):
        place(**args)


def test_deterministic_and_independent_of_node_list_order() -> None:
    rng = random.Random(3)
    sizes = [rng.randint(1, 300) * 2**20 for _ in range(24)]
    nodes = [
        NodeCapacity(f"n{i}", rng.randint(8, 30) * 100 * 2**20, rng.choice([1.0, 2.0]), i)
        for i in range(8)
    ]
    first = place(sizes, nodes, replicas=2)
    assert place(sizes, nodes, replicas=2) == first
    assert place(sizes, list(reversed(nodes)), replicas=2) == first


def test_as_dict_is_json_and_node_spans_lists_what_each_node_holds() -> None:
    placement = place([5, 5, 5], nodes_of(100, 100, 100), stages=3, overhead=1.0, fixed_overhead=0)
    data = json.loads(json.dumps(placement.as_dict()))
    assert data == {
        "version": 1,
        "spans": [
            {"span": 0, "first": 0, "last": 0, "bytes": 5, "replicas": ["a"]},
            {"span": 1, "first": 1, "last": 1, "bytes": 5, "replicas": ["b"]},
            {"span": 2, "first": 2, "last": 2, "bytes": 5, "replicas": ["c"]},
        ],
    }
    assert placement.node_spans() == {"a": [0], "b": [1], "c": [2]}


def test_a_large_ring_is_placed_quickly_and_validly() -> None:
    # Beyond exhaustive sizes the search is capped: still valid, still fast.
    rng = random.Random(11)
    sizes = [rng.randint(50, 150) * 2**20 for _ in range(40)]
    nodes = [
        NodeCapacity(f"n{i}", rng.randint(5, 30) * 100 * 2**20, rng.choice([1.0, 2.0]), i)
        for i in range(16)
    ]
    for replicas, stages in [(1, None), (2, None), (3, 4), (2, 16)]:
        start = time.perf_counter()
        placement = place(sizes, nodes, replicas=replicas, stages=stages)
        assert time.perf_counter() - start < 5.0
        check_valid(placement, sizes, nodes, replicas, 1.15, 150 * 2**20)
