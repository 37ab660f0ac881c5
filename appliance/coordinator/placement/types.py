"""The data of placement: node capacities in, spans on nodes out, and a span's memory need."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

DEFAULT_OVERHEAD = 1.15
DEFAULT_FIXED_OVERHEAD = 150 * 2**20


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


def span_need(
    span_bytes: int,
    overhead: float = DEFAULT_OVERHEAD,
    fixed_overhead: int = DEFAULT_FIXED_OVERHEAD,
) -> int:
    """Bytes of node memory a span of `span_bytes` needs: ceil(overhead * bytes) + fixed.

    The overhead is taken as the decimal it is written as (1.15 = 23/20), so the result is exact
    and the same everywhere it is computed.
    """
    return math.ceil(ratio(overhead) * span_bytes) + fixed_overhead


def ratio(overhead: float) -> Fraction:
    """The overhead as the decimal it is written as (1.15 = 23/20): exact everywhere."""
    return Fraction(repr(float(overhead)))
