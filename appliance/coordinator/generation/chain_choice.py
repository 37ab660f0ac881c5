"""Which replica of each span a new sequence is pinned to: a pure function over plain data.

Every token of a sequence crosses every link of its chain, so for decode the chain's summed
link latency is paid per token. Among the chains through live replicas, the choice is, in
order: the longest cached prefix of the prompt (the smallest along the chain: where all its
spans can start), the least loaded chain (the sequences pinned on its nodes, summed along it:
every span's replicas share the load, not only the first's), then the lowest summed latency
from the coordinator along the chain. Links not measured count the median of the measured
ones.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

U = TypeVar("U", bound=str)  # a replica's URL

MAX_CHAINS = 4096  # past this many combinations, spans are chosen one after another
ORIGIN = ""  # the coordinator's end of the first link


def choose_chain(
    candidates: Sequence[Sequence[U]],
    cached: Callable[[int, U], int],
    load: Mapping[U, int],
    latency: Mapping[tuple[str, str], float],
) -> list[U]:
    """One replica per span from ``candidates`` (each span's live replicas, preference order
    breaking the last ties); ``cached(span index, replica)``: prompt tokens it holds cached;
    ``load[replica]``: sequences pinned on it, once for each span of their chain it holds;
    ``latency[(from, to)]``: a link's latency in seconds, ``ORIGIN`` for the coordinator."""
    if any(not c for c in candidates):
        raise ValueError("every span needs at least one candidate replica")
    known = [v for v in latency.values() if math.isfinite(v) and v >= 0]
    default = statistics.median(known) if known else 0.0

    def link(a: str, b: str) -> float:
        return latency.get((a, b), default)

    def key(chain: Sequence[U]) -> tuple[int, int, float, tuple[int, ...]]:
        prefix = min(cached(i, u) for i, u in enumerate(chain))
        hops: list[str] = [ORIGIN, *chain]
        summed = sum((link(a, b) for a, b in itertools.pairwise(hops) if a != b), 0.0)
        rank = tuple(candidates[i].index(u) for i, u in enumerate(chain))
        pinned = sum(load.get(u, 0) for u in chain)
        return (-prefix, pinned, round(summed, 9), rank)

    if math.prod(len(c) for c in candidates) <= MAX_CHAINS:
        chains: list[list[U]] = [list(c) for c in itertools.product(*candidates)]
        return min(chains, key=key)
    chain: list[U] = []  # too many to try: the best next replica, span by span
    for options in candidates:
        chain.append(min(options, key=lambda u: (*key([*chain, u])[:3], options.index(u))))
    return chain
