"""Placement: cut a model's segments into contiguous spans and give each span to ring nodes.

A pure function over plain data (segment sizes, node budgets), as exo's `placement_utils.py`:
no I/O, deterministic, so the coordinator can recompute it and tests can check it exhaustively.

`place` picks the number of spans K (given, or the smallest that fits), then the split that
minimises the largest span's bytes, then among those the assignment that chains consecutive spans
on ring neighbours and puts heavier spans on faster nodes (``search``); a refusal says what is
short (``explain``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from appliance.coordinator.placement.explain import explain
from appliance.coordinator.placement.link_cost import LinkCost
from appliance.coordinator.placement.refine import Refiner
from appliance.coordinator.placement.search import _Planner
from appliance.coordinator.placement.types import (
    DEFAULT_FIXED_OVERHEAD,
    DEFAULT_OVERHEAD,
    LinkFigure,
    NodeCapacity,
    Placement,
    SpanAssignment,
    ratio,
    span_need,
)
from appliance.errors import DoesNotFit, PlacementError

__all__ = [
    "DEFAULT_FIXED_OVERHEAD",
    "DEFAULT_OVERHEAD",
    "DoesNotFit",
    "LinkFigure",
    "NodeCapacity",
    "Placement",
    "PlacementError",
    "SpanAssignment",
    "place",
    "span_need",
]


def place(
    segment_bytes: Sequence[int],
    nodes: Sequence[NodeCapacity],
    replicas: int = 1,
    stages: int | None = None,
    overhead: float = DEFAULT_OVERHEAD,
    fixed_overhead: int = DEFAULT_FIXED_OVERHEAD,
    version: int = 1,
    links: Mapping[tuple[str, str], LinkFigure] | None = None,
    frontier_bytes: Sequence[int | None] = (),
    input_bytes: int | None = None,
) -> Placement:
    """Place `segment_bytes` (in pipeline order) as spans on `nodes`, `replicas` nodes per span.

    With `stages` the placement has exactly that many spans, else the fewest that fit. A node may
    hold several spans while their needs (`span_need`) fit its budget; replicas of one span are on
    distinct nodes. Raises `PlacementError` naming the shortfall when nothing fits.

    `links` ((from, to) node ids, the coordinator as "coordinator") with `frontier_bytes` (per
    segment, the bytes per row it hands the next) and `input_bytes` break ties between
    placements of equal memory by what their cuts cost on the links (``link_cost``).
    """
    sizes = _check_segments(segment_bytes)
    ring = _check_nodes(nodes)
    _check_numbers(replicas, stages, overhead, fixed_overhead, len(sizes))
    if replicas > len(ring):
        names = ", ".join(n.node_id for n in ring)
        raise DoesNotFit(
            f"{replicas} replicas asked but the ring has only {len(ring)} node(s) ({names}): "
            "replicas of a span go to distinct nodes"
        )
    planner = _Planner(sizes, ring, replicas, ratio(overhead), fixed_overhead)
    found = planner.solve(stages)
    if found is None:
        raise DoesNotFit(explain(planner, stages))
    cost = LinkCost(ring, links or {}, frontier_bytes, input_bytes) if links else None
    spans = Refiner(planner, *found, cost).run()
    return Placement(version=version, spans=tuple(planner.assignments(spans)))


# -- validation ---------------------------------------------------------------------------------


def _check_segments(segment_bytes: Sequence[int]) -> list[int]:
    if len(segment_bytes) == 0:
        raise PlacementError("segment_bytes is empty: a model package has at least one segment")
    sizes = list(segment_bytes)
    for index, size in enumerate(sizes):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise PlacementError(
                f"segment_bytes[{index}] = {size!r}: segment sizes are integers >= 0 (bytes)"
            )
    return sizes


def _check_nodes(nodes: Sequence[NodeCapacity]) -> list[NodeCapacity]:
    if len(nodes) == 0:
        raise PlacementError("no nodes to place on: at least one node is needed")
    seen: set[str] = set()
    duplicates: list[str] = []
    for node in nodes:
        if node.node_id in seen and node.node_id not in duplicates:
            duplicates.append(node.node_id)
        seen.add(node.node_id)
        budget = node.memory_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise PlacementError(
                f"node {node.node_id}: memory_budget {budget!r}: budgets are integers >= 0 (bytes)"
            )
        if not (math.isfinite(node.throughput) and node.throughput > 0):
            raise PlacementError(
                f"node {node.node_id}: throughput {node.throughput!r}: "
                "throughput is a finite number > 0"
            )
    if duplicates:
        raise PlacementError(
            f"duplicate node ids: {', '.join(duplicates)}; every node needs its own id"
        )
    # Ring order: join order, ties (should not happen) by id so the result stays deterministic.
    return sorted(nodes, key=lambda n: (n.ring_index, n.node_id))


def _check_numbers(
    replicas: int, stages: int | None, overhead: float, fixed_overhead: int, n: int
) -> None:
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise PlacementError(f"replicas {replicas!r}: at least 1 replica per span is needed")
    if stages is not None and (
        isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= n
    ):
        raise PlacementError(
            f"stages {stages!r} with {n} segment(s): stages is between 1 and the segment "
            f"count ({n}), or None to use the fewest spans that fit"
        )
    if not (isinstance(overhead, int | float) and math.isfinite(overhead) and overhead >= 1.0):
        raise PlacementError(
            f"overhead {overhead!r}: a finite number >= 1.0 (bytes of memory per byte of weights)"
        )
    if (
        isinstance(fixed_overhead, bool)
        or not isinstance(fixed_overhead, int)
        or fixed_overhead < 0
    ):
        raise PlacementError(f"fixed_overhead {fixed_overhead!r}: an integer >= 0 (bytes per span)")
