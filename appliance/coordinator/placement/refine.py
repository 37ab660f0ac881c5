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
    """Among placements with the optimal split size, prefer (1) the least cost of the cuts on
    the links they cross, where links are measured (``link_cost``: the largest frontier kept
    off the slowest link), (2) consecutive spans on ring neighbours, (3) the smallest max over
    nodes of bytes held / throughput, so heavy spans land on fast nodes and spans spread out.
    Branch and bound, pruned by the exact search."""

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
        self.best_key: tuple[float, int, float] = (math.inf, 1, math.inf)
        self.steps = _REFINE_STEPS

    def run(self) -> list[_Span]:
        p = self.p
        self.search.steps = _CHECK_STEPS  # for the feasibility checks it prunes with
        with contextlib.suppress(_OutOfSteps):  # keep the best found within the effort cap
            self._dfs(0, self.search.k, list(p.budgets), (), [], 0, [0.0] * p.m, 0.0)
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
    ) -> None:
        p = self.p
        cost = round(cost)  # in COST_QUANTUM_S: costs closer than that are equal
        if left == 0:
            key = (cost, -adjacency, max(load))
            if key < self.best_key:
                self.best, self.best_key = list(spans), key
            return
        self.steps -= 1
        if self.steps < 0:
            raise _OutOfSteps
        # costs only grow along a branch: one already dearer than the best cannot win, one as
        # dear can win only on adjacency and load
        if cost > self.best_key[0]:
            return
        bound = adjacency + p.r * (left if spans else left - 1)
        if cost == self.best_key[0] and (
            -bound > self.best_key[1]
            or (-bound == self.best_key[1] and max(load) >= self.best_key[2])
        ):
            return
        successors = {(q + 1) % p.m for q in previous if (q + 1) % p.m != q}
        for last in p.ends(self.search.t, first, left):
            span_bytes = p.bytes(first, last)
            need = p.need(span_bytes)
            room = [q for q in range(p.m) if free[q] >= need]
            combos = sorted(
                itertools.combinations(room, p.r),
                key=lambda c: (-len(successors.intersection(c)), -sum(p.speed[q] for q in c), c),
            )
            for combo in combos:
                for q in combo:
                    free[q] -= need
                if self.search.reach(last + 1, left - 1, tuple(sorted(free))):
                    gained = _gain(previous, combo, p.m)
                    before = [load[q] for q in combo]
                    for q in combo:
                        load[q] += span_bytes / p.speed[q]
                    spans.append((first, last, combo))
                    added = self._link_cost(previous, combo, first)
                    self._dfs(last + 1, left - 1, free, combo, spans, adjacency + gained, load,
                              cost + added)  # fmt: skip
                    spans.pop()
                    for q, value in zip(combo, before, strict=True):
                        load[q] = value
                for q in combo:
                    free[q] += need


def _gain(previous: tuple[int, ...], combo: tuple[int, ...], m: int) -> int:
    """Ring links between two consecutive spans: a replica right after one of the previous."""
    return sum(1 for a in previous for b in combo if b == (a + 1) % m and b != a)
