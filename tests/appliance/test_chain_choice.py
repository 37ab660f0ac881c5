"""The chain a new sequence is pinned to, as a pure function: the longest cached prefix along
the chain, then the least loaded chain (summed over its spans), then the lowest summed link
latency."""

from __future__ import annotations

import itertools
import random

import pytest

from appliance.coordinator.generation.chain_choice import MAX_CHAINS, ORIGIN, choose_chain


def no_cache(_index: int, _url: str) -> int:
    return 0


def test_the_chain_with_the_lowest_summed_latency_wins_when_nothing_else_differs() -> None:
    candidates = [["a1", "a2"], ["b1", "b2"], ["c1", "c2"]]
    latency = {
        (ORIGIN, "a1"): 0.001, (ORIGIN, "a2"): 0.001,
        ("a1", "b1"): 0.050, ("a1", "b2"): 0.001, ("a2", "b1"): 0.001, ("a2", "b2"): 0.050,
        ("b1", "c1"): 0.001, ("b1", "c2"): 0.030, ("b2", "c1"): 0.030, ("b2", "c2"): 0.001,
    }  # fmt: skip
    assert choose_chain(candidates, no_cache, {}, latency) == ["a1", "b2", "c2"]
    # the first span's link from the coordinator counts too
    latency[(ORIGIN, "a1")] = 0.2
    assert choose_chain(candidates, no_cache, {}, latency) == ["a2", "b1", "c1"]


def test_without_figures_the_preference_order_decides() -> None:
    candidates = [["a2", "a1"], ["b1", "b2"]]
    assert choose_chain(candidates, no_cache, {}, {}) == ["a2", "b1"]


def test_a_cached_prefix_counts_along_the_whole_chain_and_comes_first() -> None:
    held = {(0, "a1"): 64, (0, "a2"): 96, (1, "b1"): 64, (1, "b2"): 0}

    def cached(index: int, url: str) -> int:
        return held.get((index, url), 0)

    latency = {(ORIGIN, "a2"): 0.5, ("a1", "b1"): 0.001}
    # a2 holds more, but no b holds that much after it: a2 -> b1 starts at 64 as a1 -> b1 does;
    # then load and latency decide between them
    chosen = choose_chain([["a1", "a2"], ["b1", "b2"]], cached, {"a1": 3}, latency)
    assert chosen == ["a2", "b1"]  # a1 has 3 sequences started on it: load before latency
    assert choose_chain([["a1", "a2"], ["b1", "b2"]], cached, {}, latency) == ["a1", "b1"]


def test_the_load_of_every_span_counts_and_a_burst_spreads_over_every_replica() -> None:
    candidates = [["a1", "a2"], ["b1", "b2"]]
    latency = {(ORIGIN, "a1"): 0.001, (ORIGIN, "a2"): 0.002}
    # a1 is the busier first span, but b1 after it is busier still
    assert choose_chain(candidates, no_cache, {"a2": 1, "b1": 2}, latency) == ["a1", "b2"]
    # eight sequences pinned one after another, each counted on its chain's nodes at once
    load: dict[str, int] = {}
    for _ in range(8):
        for url in choose_chain(candidates, no_cache, load, latency):
            load[url] = load.get(url, 0) + 1
    assert load == {"a1": 4, "a2": 4, "b1": 4, "b2": 4}


def test_unmeasured_links_count_the_median_of_the_measured() -> None:
    # a1 -> b1 measured slow, a2's links not measured at all: a2 is taken at the median
    latency = {(ORIGIN, "a1"): 0.001, ("a1", "b1"): 0.1, (ORIGIN, "b1"): 0.001}
    assert choose_chain([["a1", "a2"], ["b1"]], no_cache, {}, latency) == ["a2", "b1"]


def test_many_spans_fall_back_to_choosing_span_by_span_and_stay_valid() -> None:
    rng = random.Random(3)
    spans = 8
    candidates = [[f"s{i}r{j}" for j in range(4)] for i in range(spans)]  # 4**8 > MAX_CHAINS
    assert 4**spans > MAX_CHAINS
    pairs = [(a, b) for i in range(spans - 1) for a in candidates[i] for b in candidates[i + 1]]
    latency = {pair: rng.uniform(0.001, 0.01) for pair in pairs}
    chain = choose_chain(candidates, no_cache, {}, latency)
    assert [c in options for c, options in zip(chain, candidates, strict=True)] == [True] * spans

    # the greedy chain is no worse than the preference-order chain it replaces
    def summed(path: list[str]) -> float:
        return sum(latency.get(p, 0.0) for p in itertools.pairwise(path))

    assert summed(chain) <= summed([c[0] for c in candidates])


def test_a_span_without_candidates_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        choose_chain([["a"], []], no_cache, {}, {})
