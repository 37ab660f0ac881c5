"""Prefix-aware routing as a pure function: heartbeats' block names parsed, a prompt's cached
prefix measured from its first block on (the chain it picks: test_chain_choice.py)."""

from __future__ import annotations

from appliance.coordinator.generation.prefix_routing import (
    HeldBlocks,
    cached_prefix,
    held_blocks,
)
from runtime.prefix_cache import block_hashes

PROMPT = list(range(1000, 1100))  # 100 tokens: three whole blocks of 32
NAMES = block_hashes(PROMPT, 32)


def test_the_blocks_a_heartbeat_reports_are_read_per_span_of_this_model_and_digest() -> None:
    load = {
        "decoder_spans": [
            {"model": "m", "digest": "d1", "first": 0, "last": 1,
             "prefix_block_tokens": 32, "prefix_blocks": NAMES[:2]},
            {"model": "m", "digest": "d1", "first": 2, "last": 3,
             "prefix_block_tokens": 16, "prefix_blocks": ["x", 3]},
            {"model": "m", "digest": "old", "first": 0, "last": 1,
             "prefix_block_tokens": 32, "prefix_blocks": NAMES},
            {"model": "other", "digest": "d1", "first": 0, "last": 1,
             "prefix_block_tokens": 32, "prefix_blocks": NAMES},
            {"model": "m", "digest": "d1", "first": 4, "last": 4, "prefix_block_tokens": 0},
            "not a span",
        ]
    }  # fmt: skip
    held = held_blocks(load, "m", "d1")
    assert held == {
        (0, 1): HeldBlocks(32, frozenset(NAMES[:2])),
        (2, 3): HeldBlocks(16, frozenset({"x"})),  # a name that is not a string is dropped
    }
    assert held_blocks({}, "m", "d1") == {} and held_blocks({"decoder_spans": None}, "m", "d") == {}


def test_a_cached_prefix_counts_whole_blocks_from_the_first_on() -> None:
    assert len(NAMES) == 3
    assert cached_prefix(PROMPT, HeldBlocks(32, frozenset(NAMES))) == 96
    assert cached_prefix(PROMPT, HeldBlocks(32, frozenset(NAMES[:2]))) == 64
    assert cached_prefix(PROMPT, HeldBlocks(32, frozenset([NAMES[0], NAMES[2]]))) == 32
    assert cached_prefix(PROMPT, HeldBlocks(32, frozenset(NAMES[1:]))) == 0  # no first block
    assert cached_prefix(PROMPT, None) == 0
    # another prompt that shares the first 40 tokens shares exactly its first block
    other = PROMPT[:40] + [7] * 60
    assert cached_prefix(other, HeldBlocks(32, frozenset(NAMES))) == 32
    # block names of another size never match
    assert cached_prefix(PROMPT, HeldBlocks(16, frozenset(NAMES))) == 0
