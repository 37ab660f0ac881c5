"""The exact search behind ``place``: the split and the packing solved together.

A depth-first search memoised on the multiset of free budgets (which is all feasibility depends
on), its effort capped so large inputs stay fast and deterministic; a branch and bound then
prefers chained ring neighbours and heavy spans on fast nodes among the optimal placements.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

from appliance.coordinator.placement.types import NodeCapacity, SpanAssignment

# Search effort caps, in expanded states (a few us each). Exact far beyond the tested sizes; past
# them the search stops deterministically and falls back to a greedy packing and to the best
# assignment found so far, so a large ring still gets a valid placement in well under a second.
_SEARCH_STEPS = 150_000  # all feasibility checks of one `place` call together
_CHECK_STEPS = 25_000  # one check, so one hard proof cannot starve the next span count
_REFINE_STEPS = 5_000  # the tie-breaking branch and bound


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

    def solve(self, stages: int | None) -> tuple[_Search, list[_Span]] | None:
        """The smallest largest span that fits, with its search (for the refiner), or None."""
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
            return search, best
        return None

    def _all_sums(self) -> set[int]:
        if self._sums is None:
            self._sums = {self.bytes(i, j) for i in range(self.n) for j in range(i, self.n)}
        return self._sums

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
