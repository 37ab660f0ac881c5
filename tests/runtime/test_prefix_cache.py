"""Prefix reuse in a decoder slot on the tiny Llama: prompts sharing a 400-token prefix compute
only their tails once it is cached, with the tokens of an uncached run; blocks live inside the
KV budget and give way to live sequences."""

from __future__ import annotations

import time

import numpy as np

from runtime.decoder_slots import DecoderSlot
from runtime.prefix_cache import block_hashes
from tests.runtime.test_step_batcher import GREEDY, make_registry

PREFIX = np.random.default_rng(21).integers(3, 300, size=400).tolist()
TAILS = [[9, 8, 7, 6, 5], [40, 41, 42], [100, 101, 102, 103, 104, 105, 106, 107, 108]]
NEW = 8


def test_block_names_chain_over_every_id_before_them() -> None:
    a = block_hashes(list(range(100)), 32)
    assert len(a) == 3 and len(set(a)) == 3
    assert block_hashes(list(range(96)) + [1, 2], 32) == a  # only whole blocks are named
    changed = block_hashes([5, *range(1, 100)], 32)
    assert all(x != y for x, y in zip(a, changed, strict=True))  # block 0 differs: all do
    assert block_hashes(list(range(31)), 32) == []


async def generate(
    slot: DecoderSlot, name: str, prompt: list[int], prefix: bool
) -> tuple[int, list[int]]:
    cached = await slot.open(name, len(prompt) + NEW, GREEDY, time.monotonic(),
                             prompt if prefix else None)  # fmt: skip
    result = await slot.step(name, cached, np.array([prompt[cached:]]), time.monotonic())
    tokens = []
    for k in range(NEW - 1):
        assert result.token is not None
        tokens.append(result.token)
        result = await slot.step(name, len(prompt) + k, np.array([[tokens[-1]]]), time.monotonic())
    slot.close(name)
    return cached, tokens


async def test_a_shared_400_token_prefix_is_computed_once_and_changes_no_token() -> None:
    plain = await make_registry(prefix_block_tokens=0)
    reuse = await make_registry(prefix_block_tokens=32)
    try:
        off, on = plain.slots["tiny"], reuse.slots["tiny"]
        prompts = [PREFIX + tail for tail in TAILS]
        want = [(await generate(off, f"p{i}", p, True))[1] for i, p in enumerate(prompts)]
        got = [await generate(on, f"r{i}", p, True) for i, p in enumerate(prompts)]
        aligned = len(PREFIX) // 32 * 32
        assert [c for c, _ in got] == [0, aligned, aligned]
        assert [t for _, t in got] == want
        saved = off.info()["prefill_tokens"] - on.info()["prefill_tokens"]
        assert saved >= 2 * aligned, (off.info(), on.info())
        info = on.info()
        assert (info["prefix_hits"], info["prefix_misses"]) == (2, 1)
        assert info["prefix_cached_tokens"] == 2 * aligned
        assert info["prefix_blocks"][-1] == block_hashes(PREFIX, 32)[0]  # newest first
        assert reuse.budget.stats().cached_blocks == len(on.cache) >= aligned // 32
        # the first step may start anywhere up to the cached tokens: the KV is cut there
        cached = await on.open("short", 420, GREEDY, time.monotonic(), PREFIX + [1, 2])
        result = await on.step("short", 100, np.array([(PREFIX + [1, 2])[100:]]), time.monotonic())
        assert cached == aligned and on.sequences["short"].kv.length == 402
        assert result.token == (await generate(off, "x", PREFIX + [1, 2], False))[1][0]
    finally:
        plain.close()
        reuse.close()


async def test_cache_blocks_give_way_to_live_sequences_and_never_evict_them() -> None:
    registry = await make_registry(prefix_block_tokens=32, max_sequences=4)
    slot = registry.slots["tiny"]
    per_token = slot.span.kv_bytes_per_token
    registry.budget.capacity_bytes = 500 * per_token
    try:
        await generate(slot, "a", PREFIX + [1], True)
        assert len(slot.cache) == 12 and registry.budget.stats().cached_bytes == 12 * 32 * per_token
        assert registry.budget.stats().reserved_bytes == 0  # blocks are not sequences
        await slot.open("big", 300, GREEDY, time.monotonic())  # needs 300 of 500-384 free
        assert len(slot.cache) < 12 and registry.budget.free_bytes() >= 0
        kept = len(slot.cache)
        await slot.step("big", 0, np.array([list(range(3, 250))]), time.monotonic())
        names = block_hashes(PREFIX, 32)
        assert all(name in slot.cache for name in names[:kept])  # the deepest went first
        cached, _ = await generate(slot, "b", PREFIX[:100], True)  # fits beside "big"
        assert cached == min(kept, 3) * 32
        assert "big" in slot.sequences and registry.budget.free_bytes() >= 0
    finally:
        registry.close()
