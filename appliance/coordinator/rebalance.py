"""Work for a node that joins after placement (``rebalance = "replicas"``): it becomes an extra
replica of the busiest span it has room for. The choice is a pure function over plain data;
the coordinator loads and warms the span there before the node is in any route.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from appliance.coordinator.placement import Placement
from runtime.memory import span_need


@dataclass(frozen=True)
class SpanLoad:
    model: str
    first: int
    last: int
    bytes: int
    replicas: tuple[str, ...]


def node_busyness(load: dict[str, Any]) -> float:
    """A node's backlog from its heartbeat: requests queued and running, and live sequences."""
    return sum(float(load.get(k) or 0) for k in ("queue_depth", "in_flight", "sequences"))


def busiest_span(
    spans: list[SpanLoad], busyness: dict[str, float], node: str, free_bytes: int
) -> SpanLoad | None:
    """Of the spans ``node`` does not hold and has room for, the one whose replicas carry the
    most backlog each (queue depth per replica: a second replica halves it); ties go to the
    span with fewer replicas, then to the heavier one. None: nothing fits."""
    candidates = [s for s in spans if node not in s.replicas and span_need(s.bytes) <= free_bytes]
    if not candidates:
        return None

    def weight(s: SpanLoad) -> tuple[float, int, int]:
        backlog = sum(busyness.get(r, 0.0) for r in s.replicas) / max(1, len(s.replicas))
        return (backlog, -len(s.replicas), s.bytes)

    return max(candidates, key=weight)


def add_replica(placement: Placement, span: SpanLoad, node: str) -> Placement:
    """``placement`` (its counter bumped) with ``node`` as one more replica of ``span``."""
    spans = tuple(
        replace(s, replicas=(*s.replicas, node))
        if (s.first, s.last) == (span.first, span.last) and node not in s.replicas
        else s
        for s in placement.spans
    )
    return Placement(placement.version + 1, spans)
