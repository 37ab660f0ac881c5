"""The data of placement: node capacities in, spans on nodes out, and a span's memory need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.memory import DEFAULT_FIXED_OVERHEAD, DEFAULT_OVERHEAD, ratio, span_need

__all__ = ["DEFAULT_FIXED_OVERHEAD", "DEFAULT_OVERHEAD", "ratio", "span_need"]


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    memory_budget: int  # bytes this node may spend on spans
    throughput: float = 1.0  # relative speed (measured); breaks ties, weights spans
    ring_index: int = 0  # position on the ring (join order); neighbours are consecutive


@dataclass(frozen=True)
class SpanAssignment:
    span: int  # span index 0..K-1 in pipeline order
    first: int  # first segment (inclusive)
    last: int  # last segment (inclusive)
    bytes: int
    replicas: tuple[str, ...]  # node ids holding it, preference order


@dataclass(frozen=True)
class Placement:
    version: int
    spans: tuple[SpanAssignment, ...]

    def node_spans(self) -> dict[str, list[int]]:
        """Node id -> the span indices it holds, in pipeline order."""
        out: dict[str, list[int]] = {}
        for span in self.spans:
            for node_id in span.replicas:
                out.setdefault(node_id, []).append(span.span)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "spans": [
                {
                    "span": s.span,
                    "first": s.first,
                    "last": s.last,
                    "bytes": s.bytes,
                    "replicas": list(s.replicas),
                }
                for s in self.spans
            ],
        }


@dataclass(frozen=True)
class LinkFigure:
    """What is known of one link between two members (appliance.ring.links)."""

    latency_s: float
    throughput_bps: float | None = None  # bytes per second; None: not measured yet
