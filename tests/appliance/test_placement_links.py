"""Placement that knows the links: among placements of equal memory, the largest frontier is
kept off the slowest link, and unmeasured or alike links change nothing."""

from __future__ import annotations

import random

from appliance.coordinator.placement import (
    LinkFigure,
    NodeCapacity,
    Placement,
    place,
    span_need,
)

SEGMENT = 100_000_000
FAST = LinkFigure(2e-4, 1.25e8)  # 1 Gbit/s
SLOW = LinkFigure(2e-4, 1.25e6)  # 10 Mbit/s


def ring(names: str, spans_each: int = 1) -> list[NodeCapacity]:
    budget = spans_each * span_need(SEGMENT) + 10
    return [NodeCapacity(n, budget, 1.0, i) for i, n in enumerate(names)]


def every_link(names: str, figure: LinkFigure) -> dict[tuple[str, str], LinkFigure]:
    return {(a, b): figure for a in ["coordinator", *names] for b in names if a != b}


def crossing(placement: Placement, cut: int) -> set[tuple[str, str]]:
    before, after = placement.spans[cut].replicas, placement.spans[cut + 1].replicas
    return {(a, b) for a in before for b in after if a != b}


def test_the_largest_frontier_is_kept_off_the_slowest_link() -> None:
    nodes = ring("abcd")
    frontier = [4_000_000, 1_000, 1_000, 1_000]  # the cut after segment 0 is an encoder's
    before = place([SEGMENT] * 4, nodes, 1, 4)
    assert crossing(before, 0) == {("a", "b")}  # ring neighbours, links unknown
    links = every_link("abcd", FAST) | {("a", "b"): SLOW, ("b", "a"): SLOW}
    after = place([SEGMENT] * 4, nodes, 1, 4, links=links, frontier_bytes=frontier)
    assert crossing(after, 0) & {("a", "b"), ("b", "a")} == set()
    # equal memory: the same spans, each node holding one
    assert [(s.first, s.last, s.bytes) for s in after.spans] == [
        (s.first, s.last, s.bytes) for s in before.spans
    ]
    assert sorted(r for s in after.spans for r in s.replicas) == list("abcd")


def test_with_replicas_the_mean_over_the_pairs_counts() -> None:
    nodes = ring("abcdef")
    links = every_link("abcdef", FAST)
    for a, b in (("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")):
        links[(a, b)] = links[(b, a)] = SLOW
    frontier = [8_000_000, 1_000, 1_000]
    placement = place([SEGMENT] * 3, nodes, 2, 3, links=links, frontier_bytes=frontier)
    slow = {pair for pair, figure in links.items() if figure is SLOW}
    assert crossing(placement, 0) & slow == set()


def test_no_equal_memory_alternative_keeps_the_memory_optimal_placement() -> None:
    # only a and b can hold the big span: the big frontier must cross a slow link
    big = span_need(2 * SEGMENT) + 10
    nodes = [NodeCapacity("a", big, 1.0, 0), NodeCapacity("b", span_need(SEGMENT) + 10, 1.0, 1)]
    links = {("a", "b"): SLOW, ("b", "a"): SLOW, ("coordinator", "a"): FAST,
             ("coordinator", "b"): FAST}  # fmt: skip
    placement = place([SEGMENT, SEGMENT, SEGMENT], nodes, 1, 2, links=links,
                      frontier_bytes=[10**7, 10**7, 0])  # fmt: skip
    assert [s.replicas for s in placement.spans] == [("a",), ("b",)]
    assert [s.bytes for s in placement.spans] == [2 * SEGMENT, SEGMENT]


def test_alike_or_unmeasured_links_give_the_placement_of_no_links() -> None:
    """(Frontiers that differ do move cuts on alike links: to the smaller one, rightly.)"""
    rng = random.Random(7)
    for _ in range(40):
        count = rng.randint(2, 6)
        names = "abcdef"[:count]
        spans_each = rng.randint(1, 3)
        nodes = ring(names, spans_each)
        replicas = rng.randint(1, min(2, count))
        segments = [SEGMENT] * rng.randint(1, count * spans_each // replicas)
        plain = place(segments, nodes, replicas)
        # loopback-like links: jitter between 0.1 and 0.6 ms, throughput above 10 Gbit/s
        alike = {pair: LinkFigure(rng.uniform(1e-4, 6e-4), rng.uniform(2e9, 5e9))
                 for pair in every_link(names, FAST)}  # fmt: skip
        frontier = [rng.choice([1_000, 4_000])] * len(segments)  # a decoder's: all alike
        assert place(segments, nodes, replicas, links=alike, frontier_bytes=frontier) == plain
        # links to nodes outside the ring only: nothing is known of this ring
        other = {("x", "y"): SLOW}
        assert place(segments, nodes, replicas, links=other, frontier_bytes=frontier) == plain


def test_links_between_nodes_slowed_by_jitter_do_not_pull_two_spans_onto_one_node() -> None:
    """Both nodes could hold both spans and the links between them measured slower than the
    coordinator's (a busy host's jitter: seen in CI, where a model's two spans landed on one
    node and the other held nothing): the spans stay spread, one per node."""
    nodes = ring("ab", spans_each=2)
    fast, jittery = LinkFigure(5e-4, 3e9), LinkFigure(6e-3, 3e9)
    links = every_link("ab", fast) | {("a", "b"): jittery, ("b", "a"): jittery}
    placement = place([SEGMENT] * 2, nodes, 1, 2, links=links, frontier_bytes=[1_000, 1_000])
    assert sorted(r for s in placement.spans for r in s.replicas) == ["a", "b"], placement
    assert place([SEGMENT] * 2, nodes, 1, 2) == placement


def test_a_node_slow_on_every_link_still_gets_a_span_while_others_would_double_up() -> None:
    """Nodes that could each hold two spans, and one (c) probed while its host was busy:
    every link to and from it measured slow. Before, its neighbours took two spans each way
    round it (the cheaper links) and c held nothing (seen in CI); the spread comes first."""
    fast, jittery = LinkFigure(5e-4, 3e9), LinkFigure(6e-3, 3e9)

    def held(names: str) -> list[str]:
        links = {pair: jittery if "c" in pair else fast for pair in every_link(names, fast)}
        placement = place([SEGMENT] * 3, ring(names, spans_each=2), 1, 3, links=links,
                          frontier_bytes=[1_000] * 3)  # fmt: skip
        return sorted(r for s in placement.spans for r in s.replicas)

    assert held("abc") == ["a", "b", "c"]
    # with four nodes and three spans the slow node is the one left out
    assert held("abcd") == ["a", "b", "d"]
