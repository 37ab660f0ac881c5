"""What a placement's cuts cost on the links they cross, for placement's tie-breaking.

Every request crosses each cut once: the frontier (the tensors the cut's segment hands to the
next, in bytes per row) goes from a replica of one span to a replica of the next, and the
input from the coordinator to a replica of the first. A cut on a link costs its latency plus
the frontier over its throughput; with replicas, the mean over the pairs. Figures are rounded
to half powers of two first, so that links alike within measurement noise cost the same and
a placement does not change when a figure wobbles. Links not measured cost the median of the
measured ones: neither shunned nor sought.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from appliance.coordinator.placement.types import LinkFigure, NodeCapacity

COORDINATOR = "coordinator"


# Below these, links count as alike: loopback and a LAN's worth of latency (a probe's jitter
# on one busy host reaches 1.5 ms), and more throughput than a 10 Gbit/s link has.
LATENCY_FLOOR_S = 2e-3
THROUGHPUT_CAP_BPS = 1.25e9
# Placements whose cuts cost less than this apart cost the same (costs are counted in it)
COST_QUANTUM_S = 50e-6


def _rounded(value: float) -> float:
    """``value`` to the nearest half power of two (values <= 0 stay 0)."""
    if value <= 0 or not math.isfinite(value):
        return 0.0
    return float(2 ** (round(2 * math.log2(value)) / 2))


def _latency(value: float) -> float:
    return _rounded(max(value, LATENCY_FLOOR_S))


def _throughput(value: float | None) -> float | None:
    return _rounded(min(value, THROUGHPUT_CAP_BPS)) if value else None


class LinkCost:
    def __init__(
        self,
        ring: Sequence[NodeCapacity],
        links: Mapping[tuple[str, str], LinkFigure],
        frontier_bytes: Sequence[int | None],
        input_bytes: int | None,
    ) -> None:
        ids = [COORDINATOR, *(n.node_id for n in ring)]
        known = [f for (a, b), f in links.items() if a in ids and b in ids]
        self.active = bool(known)
        latencies = [_latency(f.latency_s) for f in known]
        speeds = [t for f in known if (t := _throughput(f.throughput_bps))]
        default = LinkFigure(
            statistics.median(latencies) if latencies else 0.0,
            statistics.median(speeds) if speeds else None,
        )
        self.frontier = list(frontier_bytes)
        self.input_bytes = input_bytes or 0
        # [from][to] in ring positions, the coordinator last
        positions = {node_id: q for q, node_id in enumerate(n.node_id for n in ring)}
        positions[COORDINATOR] = len(ring)
        self._figures: list[list[LinkFigure]] = [[default] * (len(ring) + 1)
                                                 for _ in range(len(ring) + 1)]  # fmt: skip
        for (a, b), figure in links.items():
            if a in positions and b in positions:
                self._figures[positions[a]][positions[b]] = LinkFigure(
                    _latency(figure.latency_s), _throughput(figure.throughput_bps)
                )
        self._coordinator = len(ring)
        # two spans on one node still hop over its loopback: it costs what the node's fastest
        # link to another node costs, not less, so that the links never pull spans onto one
        # node (a busy host's jitter did, leaving a node empty); their spread decides
        self._loopback: list[LinkFigure] = []
        for node in range(len(ring)):
            out = [self._figures[node][q] for q in range(len(ring)) if q != node]
            speeds_out = [f.throughput_bps for f in out if f.throughput_bps]
            self._loopback.append(
                LinkFigure(
                    min((f.latency_s for f in out), default=default.latency_s),
                    max(speeds_out, default=default.throughput_bps),
                )
            )

    def _pair(self, a: int, b: int, size: int) -> float:
        figure = self._figures[a][b] if a != b else self._loopback[a]
        transfer = size / figure.throughput_bps if figure.throughput_bps else 0.0
        return figure.latency_s + transfer

    def _mean(self, sources: Sequence[int], targets: Sequence[int], size: int) -> float:
        pairs = [self._pair(a, b, size) for a in sources for b in targets]
        return sum(pairs) / len(pairs)

    def entry(self, positions: Sequence[int]) -> float:
        """The coordinator's call to the first span's replicas at ``positions``."""
        if not self.active:
            return 0.0
        return self._mean([self._coordinator], positions, self.input_bytes)

    def cut(self, before: Sequence[int], after: Sequence[int], last_segment: int) -> float:
        """The cut after segment ``last_segment``, from replicas ``before`` to ``after``."""
        if not self.active:
            return 0.0
        size = self.frontier[last_segment] if last_segment < len(self.frontier) else None
        return self._mean(before, after, size or 0)
