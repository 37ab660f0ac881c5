"""Placement: cut a model's segments into contiguous spans and give each span to ring nodes.

A pure function over plain data (segment sizes, node budgets), as exo's `placement_utils.py`:
no I/O, deterministic, so the coordinator can recompute it and tests can check it exhaustively.

`place` picks the number of spans K (given, or the smallest that fits), then the split that
minimises the largest span's bytes, then among those the assignment that chains consecutive spans
on ring neighbours and puts heavier spans on faster nodes. The split and the packing are solved
together by an exact depth-first search (memoised on the multiset of free budgets, which is all
feasibility depends on); its effort is capped so large inputs stay fast and deterministic.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

DEFAULT_OVERHEAD = 1.15
DEFAULT_FIXED_OVERHEAD = 150 * 2**20

# Search effort caps, in expanded states (a few us each). Exact far beyond the tested sizes; past
# them the search stops deterministically and falls back to a greedy packing and to the best
# assignment found so far, so a large ring still gets a valid placement in well under a second.
_SEARCH_STEPS = 150_000  # all feasibility checks of one `place` call together
_CHECK_STEPS = 25_000  # one check, so one hard proof cannot starve the next span count
_REFINE_STEPS = 5_000  # the tie-breaking branch and bound


class PlacementError(Exception):
    """No placement satisfies the request, or the request itself is invalid."""


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
    return math.ceil(_ratio(overhead) * span_bytes) + fixed_overhead


def place(
    segment_bytes: Sequence[int],
    nodes: Sequence[NodeCapacity],
    replicas: int = 1,
    stages: int | None = None,
    overhead: float = DEFAULT_OVERHEAD,
    fixed_overhead: int = DEFAULT_FIXED_OVERHEAD,
    version: int = 1,
) -> Placement:
    """Place `segment_bytes` (in pipeline order) as spans on `nodes`, `replicas` nodes per span.

    With `stages` the placement has exactly that many spans, else the fewest that fit. A node may
    hold several spans while their needs (`span_need`) fit its budget; replicas of one span are on
    distinct nodes. Raises `PlacementError` naming the shortfall when nothing fits.
    """
    sizes = _check_segments(segment_bytes)
    ring = _check_nodes(nodes)
    _check_numbers(replicas, stages, overhead, fixed_overhead, len(sizes))
    if replicas > len(ring):
        names = ", ".join(n.node_id for n in ring)
        raise PlacementError(
            f"{replicas} replicas asked but the ring has only {len(ring)} node(s) ({names}): "
            "replicas of a span go to distinct nodes"
        )
    planner = _Planner(sizes, ring, replicas, _ratio(overhead), fixed_overhead)
    spans = planner.solve(stages)
    if spans is None:
        raise PlacementError(planner.explain(stages))
    return Placement(version=version, spans=tuple(planner.assignments(spans)))


# -- validation ---------------------------------------------------------------------------------


def _ratio(overhead: float) -> Fraction:
    return Fraction(repr(float(overhead)))


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


# -- search -------------------------------------------------------------------------------------

# A span during the search: (first segment, last segment, ring positions of its replicas).
_Span = tuple[int, int, tuple[int, ...]]


class _OutOfSteps(Exception):
    """The search used its effort cap: the answer is unknown, not no."""


class _Planner:
    """One `place` call's data, precomputed sizes and search budget."""

    def __init__(
        self,
        sizes: list[int],
        ring: list[NodeCapacity],
        replicas: int,
        overhead: Fraction,
        fixed: int,
    ) -> None:
        self.sizes = sizes
        self.n = len(sizes)
        self.ring = ring
        self.m = len(ring)
        self.r = replicas
        self.overhead = overhead
        self.fixed = fixed
        self.budgets = tuple(node.memory_budget for node in ring)
        self.speed = tuple(node.throughput for node in ring)
        self.prefix = [0, *itertools.accumulate(sizes)]
        self.total = self.prefix[-1]
        self.suffix_max = [max(sizes[i:]) for i in range(self.n)] + [0]
        self.suffix_min = [min(sizes[i:]) for i in range(self.n)] + [0]
        self._needs: dict[int, int] = {}
        self._min_spans: dict[int, list[float]] = {}
        self._sums: set[int] | None = None
        self.rest_need = [
            math.ceil(overhead * (self.total - self.prefix[i])) for i in range(self.n)
        ]
        self.steps = _SEARCH_STEPS
        # A span needs r distinct nodes with room, so its need is at most the r-th largest budget.
        self.rth_budget = sorted(self.budgets, reverse=True)[replicas - 1]
        self.t_cap = self._largest_fitting(self.rth_budget)

    # -- sizes --

    def bytes(self, first: int, last: int) -> int:
        return self.prefix[last + 1] - self.prefix[first]

    def need(self, span_bytes: int) -> int:
        cached = self._needs.get(span_bytes)
        if cached is None:
            cached = math.ceil(self.overhead * span_bytes) + self.fixed
            self._needs[span_bytes] = cached
        return cached

    def _largest_fitting(self, budget: int) -> int:
        """The most span bytes whose need fits `budget` (-1 if not even an empty span fits)."""
        if budget < self.fixed:
            return -1
        guess = math.floor((budget - self.fixed) / self.overhead)
        while self.need(guess + 1) <= budget:
            guess += 1
        while guess >= 0 and self.need(guess) > budget:
            guess -= 1
        return guess

    def min_spans(self, t: int) -> list[float]:
        """min_spans(t)[i]: fewest spans of <= t bytes covering segments i..n-1 (inf: none)."""
        table = self._min_spans.get(t)
        if table is None:
            table = [math.inf] * self.n + [0.0]
            for i in range(self.n - 1, -1, -1):
                j = i
                while j < self.n and self.bytes(i, j) <= t:
                    j += 1
                if j > i:  # the greedy longest first span is optimal for the count
                    table[i] = 1 + table[j]
            self._min_spans[t] = table
        return table

    def ends(self, t: int, first: int, left: int) -> Iterator[int]:
        """Last segments for a span starting at `first`, `left` spans to go, longest first."""
        if left == 1:
            if self.bytes(first, self.n - 1) <= t:
                yield self.n - 1
            return
        table = self.min_spans(t)
        last = first
        while last < self.n - 1 and self.bytes(first, last + 1) <= t:
            last += 1
        for j in range(last, first - 1, -1):
            if self.bytes(first, j) <= t and table[j + 1] <= left - 1 <= self.n - j - 1:
                yield j

    def may_fit(self, t: int, first: int, left: int, free: tuple[int, ...]) -> bool:
        """Cheap necessary conditions for segments first..n-1 in `left` spans of <= t bytes on
        the ascending free budgets `free`."""
        r = self.r
        rest = self.prefix[-1] - self.prefix[first]
        # Some span holds the largest segment, and some span at least an even share.
        biggest = max(self.suffix_max[first], -(-rest // left))
        if self.need(biggest) > free[-r]:
            return False
        # One replica of every remaining span needs at least `once` (sum of ceil >= ceil of
        # sum); a node holds at most one replica of each span, so at most `once + left` of it.
        once = self.rest_need[first] + left * self.fixed
        cap = once + left
        if r * once > sum(f if f < cap else cap for f in free):
            return False
        # Replica slots: how many remaining spans each node could hold at the least need; the
        # other spans hold at most t bytes, so the smallest holds what they cannot.
        smallest = self.need(max(self.suffix_min[first], rest - (left - 1) * t))
        return smallest == 0 or sum(min(left, f // smallest) for f in free) >= left * r

    def split(self, t: int, k: int) -> list[tuple[int, int]] | None:
        """One split into exactly k spans of <= t bytes (earlier spans as long as allowed)."""
        if self.min_spans(t)[0] > k:
            return None
        out: list[tuple[int, int]] = []
        first = 0
        for left in range(k, 0, -1):
            last = next(self.ends(t, first, left))
            out.append((first, last))
            first = last + 1
        return out

    def even_max(self, k: int) -> int:
        """The smallest largest-span bytes of any split into k spans (nodes aside)."""
        sums = sorted(self._all_sums())
        return next(t for t in sums if self.min_spans(t)[0] <= k)

    def thresholds(self, k: int) -> list[int]:
        """Candidate largest-span sizes for k spans: the contiguous sums that could be it."""
        low = max(max(self.sizes), -(-self.total // k))
        return sorted(s for s in self._all_sums() if low <= s <= self.t_cap)

    # -- greedy packing: the quick check before the exact search, and the error diagnosis --

    def greedy(
        self, spans: list[tuple[int, int]], worst_fit: bool = False
    ) -> tuple[list[_Span] | None, _Miss | None]:
        """Largest span first, best fit (or worst fit: spreads replicas). Returns the placement,
        or the first span that missed."""
        free = list(self.budgets)
        chosen: dict[int, tuple[int, ...]] = {}
        order = sorted(range(len(spans)), key=lambda s: (-self.bytes(*spans[s]), s))
        for s in order:
            first, last = spans[s]
            need = self.need(self.bytes(first, last))
            fits = sorted(
                (p for p in range(self.m) if free[p] >= need),
                key=lambda p: (-free[p] if worst_fit else free[p], p),
            )
            if len(fits) < self.r:
                return None, _Miss(s, first, last, need, tuple(fits), tuple(free))
            for p in fits[: self.r]:
                free[p] -= need
            chosen[s] = tuple(fits[: self.r])
        return [(first, last, chosen[s]) for s, (first, last) in enumerate(spans)], None

    # -- exact search --

    def feasible(self, k: int, t: int) -> tuple[list[_Span] | None, _Search]:
        search = _Search(self, k, t)
        split = self.split(t, k)
        if split is None:
            return None, search
        # Greedy first, on this split and on the most even one: cheap, and usually enough.
        even = self.split(self.even_max(k), k)
        for attempt, worst_fit in itertools.product((split, even), (False, True)):
            found, _ = self.greedy(attempt, worst_fit) if attempt is not None else (None, None)
            if found is not None and max(self.bytes(a, b) for a, b, _ in found) <= t:
                return found, search
        search.steps = min(self.steps, _CHECK_STEPS)
        allowed = search.steps
        try:
            if search.reach(0, k, tuple(sorted(self.budgets))):
                return search.witness(), search
        except _OutOfSteps:
            pass  # unknown: treated as no, so the binary search settles on a larger size
        finally:
            self.steps -= allowed - max(search.steps, 0)
        return None, search

    def solve(self, stages: int | None) -> list[_Span] | None:
        if self.t_cap < max(self.sizes):
            return None
        if stages is not None:
            counts: Iterator[int] = iter([stages])
        else:
            counts = iter(range(int(self.min_spans(self.t_cap)[0]), self.n + 1))
        for k in counts:
            lower = self.r * (math.ceil(self.overhead * self.total) + k * self.fixed)
            if lower > sum(self.budgets):
                break  # more spans only add fixed overhead
            candidates = self.thresholds(k)
            if not candidates:
                continue
            best, search = self.feasible(k, candidates[-1])
            if best is None:
                continue
            lo, hi = 0, len(candidates) - 1  # candidates[hi] is feasible
            while lo < hi:
                mid = (lo + hi) // 2
                found, found_search = self.feasible(k, candidates[mid])
                if found is not None:
                    hi, best, search = mid, found, found_search
                else:
                    lo = mid + 1
            return _Refiner(self, search, best).run()
        return None

    # -- output --

    def assignments(self, spans: list[_Span]) -> Iterator[SpanAssignment]:
        previous: tuple[int, ...] = ()
        for index, (first, last, positions) in enumerate(spans):
            ordered = self._preference(positions, previous)
            previous = ordered
            yield SpanAssignment(
                span=index,
                first=first,
                last=last,
                bytes=self.bytes(first, last),
                replicas=tuple(self.ring[p].node_id for p in ordered),
            )

    def _preference(self, positions: tuple[int, ...], previous: tuple[int, ...]) -> tuple[int, ...]:
        """Replica order: slot q follows the previous span's slot q along the ring where it can,
        so each preference rank forms a chain of neighbours; the rest fastest first."""
        slots: list[int | None] = [None] * len(positions)
        rest = set(positions)
        for q, p in enumerate(previous):
            successor = (p + 1) % self.m
            if successor in rest and successor != p:
                slots[q] = successor
                rest.discard(successor)
        fill = iter(sorted(rest, key=lambda p: (-self.speed[p], p)))
        return tuple(p if p is not None else next(fill) for p in slots)

    # -- refusal --

    def explain(self, stages: int | None) -> str:
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
            return head + ": " + self._shortfall(big, big, need, holders, self.budgets, None)
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
        detail = self._shortfall(miss.first, miss.last, miss.need, holders, miss.free, miss.span)
        return f"{head}: with {k} span(s), {detail}"

    def _all_sums(self) -> set[int]:
        if self._sums is None:
            self._sums = {self.bytes(i, j) for i in range(self.n) for j in range(i, self.n)}
        return self._sums

    def _shortfall(
        self,
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


@dataclass(frozen=True)
class _Miss:
    span: int
    first: int
    last: int
    need: int
    holders: tuple[int, ...]
    free: tuple[int, ...]


class _Search:
    """Exact feasibility for k spans of <= t bytes, memoised on (segment, spans left, sorted free
    budgets): nodes with equal free budget are interchangeable, which collapses the symmetry."""

    def __init__(self, planner: _Planner, k: int, t: int) -> None:
        self.p = planner
        self.k = k
        self.t = t
        self.steps = 0
        self.memo: dict[tuple[int, int, tuple[int, ...]], bool] = {}
        self.choice: dict[tuple[int, int, tuple[int, ...]], tuple[int, tuple[int, ...]]] = {}

    def reach(self, first: int, left: int, free: tuple[int, ...]) -> bool:
        key = (first, left, free)
        known = self.memo.get(key)
        if known is not None:
            return known
        self.steps -= 1
        if self.steps < 0:
            raise _OutOfSteps
        ok = self._expand(key)
        self.memo[key] = ok
        return ok

    def _expand(self, key: tuple[int, int, tuple[int, ...]]) -> bool:
        first, left, free = key
        p = self.p
        if left == 0 or first == p.n:
            return left == 0 and first == p.n
        if not p.may_fit(self.t, first, left, free):
            return False
        for last in p.ends(self.t, first, left):
            need = p.need(p.bytes(first, last))
            for combo in _combos(free, need, p.r):
                child = list(free)
                for q in combo:
                    child[q] -= need
                if self.reach(last + 1, left - 1, tuple(sorted(child))):
                    self.choice[key] = (last, combo)
                    return True
        return False

    def witness(self) -> list[_Span]:
        """Turn the recorded choices back into spans on concrete nodes."""
        free = list(self.p.budgets)
        out: list[_Span] = []
        first, left = 0, self.k
        while left:
            order = sorted(range(self.p.m), key=lambda q: (free[q], q))
            last, combo = self.choice[(first, left, tuple(free[q] for q in order))]
            positions = tuple(sorted(order[q] for q in combo))
            need = self.p.need(self.p.bytes(first, last))
            for q in positions:
                free[q] -= need
            out.append((first, last, positions))
            first, left = last + 1, left - 1
        return out


def _combos(free: tuple[int, ...], need: int, r: int) -> Iterator[tuple[int, ...]]:
    """r distinct indices into the ascending `free` with room for `need`, smallest first (best
    fit), one representative per multiset of values."""
    start = bisect.bisect_left(free, need)
    for combo in itertools.combinations(range(start, len(free)), r):
        chosen = set(combo)
        if all(q == start or free[q] != free[q - 1] or q - 1 in chosen for q in combo):
            yield combo


class _Refiner:
    """Among placements with the optimal split size, prefer (1) consecutive spans on ring
    neighbours, (2) the smallest max over nodes of bytes held / throughput, so heavy spans land
    on fast nodes and spans spread out. Branch and bound, pruned by the exact search."""

    def __init__(self, planner: _Planner, search: _Search, fallback: list[_Span]) -> None:
        self.p = planner
        self.search = search
        self.fallback = fallback
        self.best: list[_Span] | None = None
        self.best_key: tuple[int, float] = (1, math.inf)
        self.steps = _REFINE_STEPS

    def run(self) -> list[_Span]:
        p = self.p
        self.search.steps = _CHECK_STEPS  # for the feasibility checks it prunes with
        with contextlib.suppress(_OutOfSteps):  # keep the best found within the effort cap
            self._dfs(0, self.search.k, list(p.budgets), (), [], 0, [0.0] * p.m)
        if self.best is None:
            return self.fallback
        return self.best

    def _dfs(
        self,
        first: int,
        left: int,
        free: list[int],
        previous: tuple[int, ...],
        spans: list[_Span],
        adjacency: int,
        load: list[float],
    ) -> None:
        p = self.p
        if left == 0:
            key = (-adjacency, max(load))
            if key < self.best_key:
                self.best, self.best_key = list(spans), key
            return
        self.steps -= 1
        if self.steps < 0:
            raise _OutOfSteps
        bound = adjacency + p.r * (left if spans else left - 1)
        if -bound > self.best_key[0] or (
            -bound == self.best_key[0] and max(load) >= self.best_key[1]
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
                    self._dfs(last + 1, left - 1, free, combo, spans, adjacency + gained, load)
                    spans.pop()
                    for q, value in zip(combo, before, strict=True):
                        load[q] = value
                for q in combo:
                    free[q] += need


def _gain(previous: tuple[int, ...], combo: tuple[int, ...], m: int) -> int:
    """Ring links between two consecutive spans: a replica right after one of the previous."""
    return sum(1 for a in previous for b in combo if b == (a + 1) % m and b != a)


def _segments(first: int, last: int) -> str:
    return f"segment {first}" if first == last else f"segments {first}-{last}"


def _fmt(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
