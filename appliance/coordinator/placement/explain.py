"""Explaining a refusal: what is short, by how much, on which node (read by operators)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.coordinator.placement.search import _Miss, _Planner


def explain(self: _Planner, stages: int | None) -> str:
    """Why nothing fits: the first shortfall a person can act on (a segment no node can hold,
    the budgets in all, or the span that missed with the most even split)."""
    replica_word = "replica" if self.r == 1 else "replicas"
    head = (
        f"cannot place {self.n} segment(s) ({_fmt(self.total)}) on {self.m} node(s) "
        f"with {self.r} {replica_word} per span"
    )
    if stages is not None:
        head += f" in {stages} span(s)"
    big = max(range(self.n), key=lambda i: (self.sizes[i], -i))
    need = self.need(self.sizes[big])
    holders = [p for p in range(self.m) if self.budgets[p] >= need]
    if len(holders) < self.r:
        return head + ": " + _shortfall(self, big, big, need, holders, self.budgets, None)
    k_min = stages if stages is not None else int(self.min_spans(self.t_cap)[0])
    total_need = self.r * (math.ceil(self.overhead * self.total) + k_min * self.fixed)
    if total_need > sum(self.budgets):
        at_least = "" if stages is not None else "at least "
        return (
            f"{head}: {self.r} {replica_word} of {at_least}{k_min} span(s) need "
            f"{_fmt(total_need)} in all (with overhead), the nodes' budgets total "
            f"{_fmt(sum(self.budgets))}"
        )
    # Diagnose with the most even split of each span count: report the smallest shortfall.
    misses: list[tuple[int, int, _Miss]] = []
    for k in [stages] if stages is not None else range(1, self.n + 1):
        split = self.split(self.even_max(k), k)
        if split is None:
            continue
        _, miss = self.greedy(split)
        if miss is not None:
            rth_free = sorted(miss.free, reverse=True)[self.r - 1]
            misses.append((miss.need - rth_free, k, miss))
    if not misses:
        return head + ": the spans cannot be packed into the nodes' budgets"
    _, k, miss = min(misses, key=lambda x: (x[0], x[1]))
    holders = list(miss.holders)
    detail = _shortfall(self, miss.first, miss.last, miss.need, holders, miss.free, miss.span)
    return f"{head}: with {k} span(s), {detail}"


def _shortfall(
    self: _Planner,
    first: int,
    last: int,
    need: int,
    holders: list[int],
    free: Sequence[int],
    span: int | None,
) -> str:
    what = _segments(first, last)
    after = (
        " after placing the larger spans"
        if span is not None and any(f != b for f, b in zip(free, self.budgets, strict=True))
        else ""
    )
    if not holders:
        top = max(range(self.m), key=lambda p: (free[p], -p))
        verb = "needs" if first == last else "need"
        return (
            f"{what} {verb} {_fmt(need)} (with overhead), largest free budget "
            f"{_fmt(free[top])} on node {self.ring[top].node_id}{after}"
        )
    names = ", ".join(self.ring[p].node_id for p in holders)
    label = f"span {span} ({what}, " if span is not None else f"{what} ("
    return (
        f"{self.r} replicas asked but only {len(holders)} node(s) can hold "
        f"{label}{_fmt(need)} with overhead): {names}{after}"
    )


def _segments(first: int, last: int) -> str:
    return f"segment {first}" if first == last else f"segments {first}-{last}"


def _fmt(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
