"""Decode ahead on the tiny random-weight Llama held whole by one slot (real onnxruntime): the
next step runs before it is asked and answers it, tokens stay those of a slot without it
(greedy and seeded sampling, many streams at once), a step for something else undoes it, and
nothing runs past the reservation or leaves KV behind."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from runtime.decoder_slots import DecoderSlot
from runtime.sampling import SamplingParams
from tests.runtime.test_step_batcher import GREEDY, make_registry, prompts

SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11)
NEW = 12


async def generate(slot: DecoderSlot, name: str, prompt: list[int], sampling: SamplingParams,
                   new: int = NEW) -> list[int]:  # fmt: skip
    """What the coordinator does: open, the prompt, then each token fed back; then close."""
    await slot.open(name, len(prompt) + new, sampling, time.monotonic())
    result = await slot.step(name, 0, np.array([prompt]), time.monotonic())
    tokens: list[int] = []
    while True:
        assert result.token is not None
        tokens.append(result.token)
        if len(tokens) == new:
            break
        position = len(prompt) + len(tokens) - 1
        result = await slot.step(name, position, np.array([[tokens[-1]]]), time.monotonic())
    slot.close(name)
    return tokens


async def test_streams_run_ahead_give_the_tokens_of_streams_that_do_not() -> None:
    ahead = await make_registry(max_sequences=8)
    plain = await make_registry(max_sequences=8, decode_ahead=False)
    try:
        on, off = ahead.slots["tiny"], plain.slots["tiny"]
        texts = prompts(8, seed=5)
        for sampling in (GREEDY, SAMPLED):
            want = await asyncio.gather(
                *(generate(off, f"o{i}", p, sampling) for i, p in enumerate(texts))
            )
            got = await asyncio.gather(
                *(generate(on, f"a{i}", p, sampling) for i, p in enumerate(texts))
            )
            assert got == want
        info = on.info()
        # every step after the prompt was run ahead; the one after the last token is thrown
        # away when the sequence closes
        assert info["ahead_runs"] == 2 * 8 * NEW and info["ahead_discarded"] == 2 * 8
        assert info["generated_tokens"] == off.info()["generated_tokens"] == 2 * 8 * (NEW - 1)
        assert off.info()["ahead_runs"] == 0
        await asyncio.sleep(0.2)  # the last runs ahead end, and their KV goes
        assert ahead.budget.stats().reserved_bytes == 0 and not on.sequences
    finally:
        ahead.close()
        plain.close()


async def test_a_step_for_another_token_undoes_the_run_ahead() -> None:
    registry = await make_registry()
    plain = await make_registry(decode_ahead=False)
    try:
        slot, off = registry.slots["tiny"], plain.slots["tiny"]
        prompt = prompts(1, seed=9)[0]
        for s in (slot, off):
            await s.open("x", len(prompt) + NEW, GREEDY, time.monotonic())
        first = await slot.step("x", 0, np.array([prompt]), time.monotonic())
        await off.step("x", 0, np.array([prompt]), time.monotonic())
        assert first.token is not None and slot.sequences["x"].ahead is not None
        other = (first.token + 1) % 300  # not what was drawn: as a replay with other tokens
        got = await slot.step("x", len(prompt), np.array([[other]]), time.monotonic())
        want = await off.step("x", len(prompt), np.array([[other]]), time.monotonic())
        assert got.token == want.token and slot.info()["ahead_discarded"] == 1
        assert got.logits is not None and want.logits is not None
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
        # and the run ahead of that step answers the next one as usual
        assert slot.sequences["x"].ahead is not None
        assert slot.sequences["x"].ahead.position == len(prompt) + 1
    finally:
        registry.close()
        plain.close()


async def test_nothing_runs_ahead_past_the_reservation() -> None:
    registry = await make_registry()
    try:
        slot = registry.slots["tiny"]
        prompt = prompts(1, seed=4)[0]
        size = len(prompt)
        await slot.open("r", size + 3, GREEDY, time.monotonic())  # room for 3 tokens of KV
        result = await slot.step("r", 0, np.array([prompt]), time.monotonic())
        for position in (size, size + 1, size + 2):
            assert result.token is not None
            result = await slot.step("r", position, np.array([[result.token]]), time.monotonic())
        sequence = slot.sequences["r"]
        assert sequence.ahead is None and sequence.kv.length == size + 3
        assert slot.info()["ahead_runs"] == 3
    finally:
        registry.close()
