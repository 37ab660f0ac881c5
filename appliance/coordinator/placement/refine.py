"""Tie-breaking among optimal placements: chained ring neighbours first, then heavy spans on fast
nodes (a branch and bound pruned by the exact search)."""

from __future__ import annotations

import contextlib
import itertools
import math

from appliance.coordinator.placement.link_cost import COST_QUANTUM_S, LinkCost
from appliance.coordinator.placement.search import (
    _CHECK_STEPS,
    _REFINE_STEPS,
    _OutOfSteps,
    _Planner,
    _Search,
    _Span,
)


class Refiner:
    """Among placements with the optimal split size, prefer (1) the most nodes in use (a node
    holds a second span only when no node is left without one), (2) the least cost of the cuts
    on the links they cross, where links are measured (``link_cost``: the largest frontier kept
    off the slowest link), (3) consecutive spans on ring neighbours, (4) the smallest max over
    nodes of bytes held / throughput, so heavy spans land on fast nodes.
    Branch and bound, pruned by the exact search.

    Spread comes before the links because link figures on one busy host are jitter: a node
    whose probes ran while the host was loading looked slow on every link, and its spans went
    onto its neighbours, leaving it empty (seen in CI). An idle node is memory for KV and
    compute lost for as long as the placement lasts; the links still choose which cuts cross
    which links, and which nodes stay out when there are more nodes than replica slots."""

    def __init__(
        self,
        planner: _Planner,
        search: _Search,
        fallback: list[_Span],
        links: LinkCost | None = None,
    ) -> None:
        self.p = planner
        self.search = search
        self.fallback = fallback
        self.links = links
        self.best: list[_Span] | None = None
        self.best_key: tuple[float, float, int, float] = (math.inf, math.inf, 1, math.inf)
        self.steps = _REFINE_STEPS
        self.held = [0] * planner.m  # spans per node on the branch being searched

    def run(self) -> list[_Span]:
        p = self.p
        self.search.steps = _CHECK_STEPS  # for the feasibility checks it prunes with
        with contextlib.suppress(_OutOfSteps):  # keep the best found within the effort cap
            self._dfs(0, self.search.k, list(p.budgets), (), [], 0, [0.0] * p.m, 0.0, 0)
        if self.best is None:
            return self.fallback
        return self.best

    def _link_cost(self, previous: tuple[int, ...], combo: tuple[int, ...], first: int) -> float:
        if self.links is None:
            return 0.0
        if not previous:
            return self.links.entry(combo) / COST_QUANTUM_S
        return self.links.cut(previous, combo, first - 1) / COST_QUANTUM_S

    def _dfs(
        self,
        first: int,
        left: int,
        free: list[int],
        previous: tuple[int, ...],
        spans: list[_Span],
        adjacency: int,
        load: list[float],
        cost: float,
        doubled: int,
    ) -> None:
        p = self.p
        cost = round(cost)  # in COST_QUANTUM_S: costs closer than that are equal
        if left == 0:
            key = (doubled, cost, -adjacency, max(load))
            if key < self.best_key:
                self.best, self.best_key = list(spans), key
            return
        self.steps -= 1
        if self.steps < 0:
            raise _OutOfSteps
        # doubled-up slots and costs only grow along a branch: one already worse than the best
        # on them cannot win, one as good can win only on adjacency and load
        best = self.best_key
        if (doubled, cost) > (best[0], best[1]):
            return
        bound = adjacency + p.r * (left if spans else left - 1)
        if (doubled, cost) == (best[0], best[1]) and (
            -bound > best[2] or (-bound == best[2] and max(load) >= best[3])
        ):
            return
        successors = {(q + 1) % p.m for q in previous if (q + 1) % p.m != q}
        for last in p.ends(self.search.t, first, left):
            span_bytes = p.bytes(first, last)
            need = p.need(span_bytes)
            room = [q for q in range(p.m) if free[q] >= need]
            combos = sorted(
                itertools.combinations(room, p.r),
                key=lambda c: (
                    sum(1 for q in c if self.held[q]),  # nodes already holding a span: last
                    -len(successors.intersection(c)),
                    -sum(p.speed[q] for q in c),
                    c,
                ),
            )
            for combo in combos:
                for q in combo:
                    free[q] -= need
                if self.search.reach(last + 1, left - 1, tuple(sorted(free))):
                    gained = _gain(previous, combo, p.m)
                    again = sum(1 for q in combo if self.held[q])
                    before = [load[q] for q in combo]
                    for q in combo:
                        load[q] += span_bytes / p.speed[q]
                        self.held[q] += 1
                    spans.append((first, last, combo))
                    added = self._link_cost(previous, combo, first)
                    self._dfs(last + 1, left - 1, free, combo, spans, adjacency + gained, load,
                              cost + added, doubled + again)  # fmt: skip
                    spans.pop()
                    for q, value in zip(combo, before, strict=True):
                        load[q] = value
                        self.held[q] -= 1
                for q in combo:
                    free[q] += need


def _gain(previous: tuple[int, ...], combo: tuple[int, ...], m: int) -> int:
    """Ring links between two consecutive spans: a replica right after one of the previous."""
    return sum(1 for a in previous for b in combo if b == (a + 1) % m and b != a)
