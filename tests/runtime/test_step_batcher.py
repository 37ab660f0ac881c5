"""Continuous batching of a decoder slot on the tiny random-weight Llama (real onnxruntime):
batched steps answer as single-stream ones (teacher-forced logits, free-running greedy tokens),
opens queue past max_sequences, and a long prompt's chunks leave room for others' decode."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from runtime.decoder import DecoderSpan
from runtime.decoder_admission import DecoderLimits
from runtime.decoder_registry import DecoderRegistry
from runtime.decoder_slots import DecoderSlot
from runtime.errors import SequenceQueueFull
from runtime.sampling import SamplingParams
from runtime.session import SessionSettings
from tests.support.tiny_llm import LAYERS, shared_tiny_package

SETTINGS = SessionSettings(device="cpu", intra_op_threads=1)
GREEDY = SamplingParams(temperature=0.0)
STREAMS = 16
NEW_TOKENS = 10
NEAR_TIE = 2e-3


async def make_registry(**limits: object) -> DecoderRegistry:
    registry = DecoderRegistry(
        shared_tiny_package(),
        SETTINGS,
        lambda slots: 10**9,
        60.0,
        DecoderLimits(**limits),  # type: ignore[arg-type]
    )
    await registry.load("tiny-llm", 1, 0, LAYERS - 1, "tiny")
    return registry


@pytest.fixture
async def slot() -> AsyncIterator[DecoderSlot]:
    registry = await make_registry(max_sequences=STREAMS)
    yield registry.slots["tiny"]
    registry.close()


def prompts(count: int, seed: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, size=int(n)).tolist() for n in rng.integers(2, 60, size=count)]


def single_stream(span: DecoderSpan, prompt: list[int], forced: list[int] | None = None,
                  steps: int = NEW_TOKENS) -> tuple[list[np.ndarray], list[int]]:  # fmt: skip
    """One sequence alone (batch of one): each step's logits and the greedy (or forced) tokens."""
    kv = span.empty_kv()
    logits = [span.step([kv], np.array([prompt]))[0]]
    tokens: list[int] = []
    for k in range(steps):
        tokens.append(int(np.argmax(logits[-1])) if forced is None else forced[k])
        logits.append(span.step([kv], np.array([[tokens[-1]]]))[0])
    return logits, tokens


def gap(logits: np.ndarray) -> float:
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


async def batched(
    slot: DecoderSlot, name: str, prompt: list[int], forced: list[int] | None
) -> tuple[list[np.ndarray], list[int]]:
    await slot.open(name, len(prompt) + NEW_TOKENS + 1, GREEDY, time.monotonic())
    result = await slot.step(name, 0, np.array([prompt]), time.monotonic())
    logits, tokens = [result.logits], []
    for k in range(NEW_TOKENS):
        assert result.token is not None
        tokens.append(result.token if forced is None else forced[k])
        position = len(prompt) + k
        result = await slot.step(name, position, np.array([[tokens[-1]]]), time.monotonic())
        logits.append(result.logits)
    slot.close(name)
    return [np.asarray(x) for x in logits], tokens


async def test_teacher_forced_batched_logits_equal_single_stream(slot: DecoderSlot) -> None:
    cases = prompts(STREAMS)
    reference = [single_stream(slot.span, p) for p in cases]
    got = await asyncio.gather(
        *(batched(slot, f"s{i}", p, reference[i][1]) for i, p in enumerate(cases))
    )
    checked = 0
    for (want, _), (logits, _) in zip(reference, got, strict=True):
        for w, g in zip(want, logits, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-3, rtol=0)
            if gap(w) >= NEAR_TIE:
                assert int(np.argmax(g)) == int(np.argmax(w))
                checked += 1
    assert checked > STREAMS * NEW_TOKENS // 2
    sizes = slot.batcher.stats.decode_batches
    assert max(sizes) >= STREAMS // 2, sizes  # the decode steps really ran together


async def test_free_running_batched_greedy_equals_single_stream(slot: DecoderSlot) -> None:
    cases = prompts(STREAMS, seed=11)
    reference = [single_stream(slot.span, p) for p in cases]
    got = await asyncio.gather(*(batched(slot, f"f{i}", p, None) for i, p in enumerate(cases)))
    ties = 0
    for (want_logits, want), (_, tokens) in zip(reference, got, strict=True):
        tie = next((k for k, w in enumerate(want_logits) if gap(w) < NEAR_TIE), None)
        upto = NEW_TOKENS if tie is None else tie
        ties += tie is not None
        assert tokens[:upto] == want[:upto]
    print(f"free-running: {ties} of {STREAMS} streams met a near-tie (gap < {NEAR_TIE})")
    assert max(slot.batcher.stats.decode_batches) > 1


async def test_opens_past_max_sequences_queue_then_proceed_and_a_full_queue_is_503() -> None:
    registry = await make_registry(max_sequences=2, max_queued_sequences=2, queue_timeout_s=5)
    slot = registry.slots["tiny"]
    try:
        for name in ("a", "b"):
            assert await slot.open(name, 8, GREEDY, time.monotonic()) == 0
        waiting = [asyncio.create_task(slot.open(n, 8, GREEDY, time.monotonic())) for n in "cd"]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in waiting) and len(slot.waiting) == 2
        assert slot.info()["sequences_queued"] == 2
        with pytest.raises(SequenceQueueFull, match="max_queued_sequences 2") as full:
            await slot.open("e", 8, GREEDY, time.monotonic())
        assert full.value.retry_after_s >= 1
        slot.close("a")  # its place goes to the oldest waiting open
        await asyncio.wait_for(waiting[0], 1)
        assert not waiting[1].done() and set(slot.sequences) == {"b", "c"}
        await slot.step("c", 0, np.array([[5, 6, 7]]), time.monotonic())  # it really runs
        slot.close("b")
        await asyncio.wait_for(waiting[1], 1)
        assert set(slot.sequences) == {"c", "d"} and not slot.waiting
    finally:
        registry.close()


async def test_an_open_waits_for_kv_and_times_out_with_503() -> None:
    registry = await make_registry(max_sequences=8, queue_timeout_s=0.3)
    slot = registry.slots["tiny"]
    registry.budget.capacity_bytes = 40 * slot.span.kv_bytes_per_token
    try:
        await slot.open("holder", 30, GREEDY, time.monotonic())
        started = time.monotonic()
        with pytest.raises(SequenceQueueFull, match="waited 0.3s"):
            await slot.open("late", 20, GREEDY, time.monotonic())
        assert time.monotonic() - started >= 0.25 and "late" not in slot.sequences
        waiter = asyncio.create_task(slot.open("next", 20, GREEDY, time.monotonic()))
        await asyncio.sleep(0.05)
        slot.close("holder")  # its KV frees: the waiting open is admitted
        assert await asyncio.wait_for(waiter, 1) == 0 and "next" in slot.sequences
    finally:
        registry.close()


async def decode_while_prefill(chunk: int) -> tuple[int, np.ndarray]:
    """Decode steps of 3 short sequences finished while a 900-token prompt ran, and that
    prompt's logits."""
    registry = await make_registry(max_sequences=8, prefill_chunk_tokens=chunk)
    slot = registry.slots["tiny"]
    try:
        short = prompts(3, seed=5)
        for i, p in enumerate(short):
            await slot.open(f"s{i}", len(p) + 400, GREEDY, time.monotonic())
            await slot.step(f"s{i}", 0, np.array([p]), time.monotonic())
        long_prompt = np.random.default_rng(9).integers(3, 300, size=900).tolist()
        await slot.open("long", 901, GREEDY, time.monotonic())
        done = asyncio.Event()
        counts = [0, 0, 0]

        async def decode(i: int) -> None:
            position = len(short[i])
            while not done.is_set():
                await slot.step(f"s{i}", position, np.array([[7]]), time.monotonic())
                position += 1
                counts[i] += 1

        tasks = [asyncio.create_task(decode(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        before = sum(counts)
        result = await slot.step("long", 0, np.array([long_prompt]), time.monotonic())
        during = sum(counts) - before
        done.set()
        await asyncio.gather(*tasks)
        assert result.logits is not None
        return during, result.logits
    finally:
        registry.close()


async def test_a_chunked_long_prefill_lets_the_others_decode() -> None:
    chunked, logits = await decode_while_prefill(64)
    whole, want = await decode_while_prefill(0)
    print(f"decode steps of 3 streams during a 900-token prefill: chunked {chunked}, whole {whole}")
    assert chunked >= 3 * 5  # ~14 chunks, a decode batch of the three between each two
    assert whole <= 3 * 2  # unchunked, they wait for the whole prompt
    np.testing.assert_allclose(logits, want, atol=1e-3, rtol=0)


async def test_a_span_holding_part_of_a_model_gathers_only_its_cohort() -> None:
    """A whole model gathers up to every row; a span holding part of one gathers up to its
    cohort's rows, and not at all when it runs every step waiting as one batch."""
    gathers = {}
    for cohorts in (2, 1):
        registry = await make_registry(gather_s=0.004, decode_cohorts=cohorts)
        try:
            await registry.load("tiny-llm", 1, 0, LAYERS // 2 - 1, "front")
            await registry.load("tiny-llm", 1, LAYERS // 2, LAYERS - 1, "back")
            for name, slot in registry.slots.items():
                gathers[f"{name}-{cohorts}"] = (slot.batcher.gather_s, slot.batcher.cohorts)
        finally:
            registry.close()
    assert gathers == {
        "tiny-2": (0.004, 1), "front-2": (0.004, 2), "back-2": (0.004, 2),
        "tiny-1": (0.004, 1), "front-1": (0.0, 1), "back-1": (0.0, 1),
    }  # fmt: skip


async def front_span_runs(cohorts: int) -> tuple[dict[int, int], list[np.ndarray]]:
    """4 sequences on a span holding the first half of the model, every step submitted at
    once for 5 tokens: its decode runs by rows, and the hidden states of the last step."""
    registry = await make_registry(decode_cohorts=cohorts)
    try:
        await registry.load("tiny-llm", 1, 0, LAYERS // 2 - 1, "front")
        front = registry.slots["front"]
        names = [f"s{i}" for i in range(4)]
        for name in names:
            await front.open(name, 16, None, time.monotonic())
        await asyncio.gather(*(front.step(n, 0, np.array([[5, 6, 7]]), time.monotonic())
                               for n in names))  # fmt: skip
        last: list[np.ndarray] = []
        for k in range(5):
            results = await asyncio.gather(
                *(front.step(n, 3 + k, np.array([[10 + i + k]]), time.monotonic())
                  for i, n in enumerate(names))
            )  # fmt: skip
            last = [np.asarray(r.hidden) for r in results]
        return dict(front.batcher.stats.decode_batches), last
    finally:
        registry.close()


async def test_a_span_holding_part_of_a_model_splits_its_steps_into_cohorts() -> None:
    """Two cohorts of 2 rows instead of one batch of 4 (so that the next span can run one
    while this one runs the other), with the same hidden states."""
    split, split_hidden = await front_span_runs(2)
    one, one_hidden = await front_span_runs(1)
    assert split == {2: 10}, split
    assert one == {4: 5}, one
    for a, b in zip(split_hidden, one_hidden, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


async def test_chance_cohorts_on_a_span_holding_part_of_a_model_merge_into_two() -> None:
    """4 streams whose prompts finish apart start as cohorts of 1, 1 and 2 rows; a span in
    cohorts (2) waits for rows of the others while there are more than 2, so the streams run
    as two cohorts of 2, which stay apart (the other spans' time between steps: 10 ms)."""
    from concurrent.futures import ThreadPoolExecutor

    from runtime.decoder_load import load_decoder_span
    from runtime.package import open_package
    from runtime.step_batcher import StepBatcher

    package = open_package(shared_tiny_package(), "tiny-llm")
    span = load_decoder_span(package, SETTINGS, 0, LAYERS // 2 - 1)
    executor = ThreadPoolExecutor(1)
    live: set[str] = set()
    batcher = StepBatcher(span, executor, max_rows=16, gather_s=0.05, cohorts=2,
                          active=lambda: len(live))  # fmt: skip
    started: list[int] = []
    marks: dict[str, dict[int, int]] = {}

    async def stream(key: str, start_s: float) -> None:
        await asyncio.sleep(start_s)
        live.add(key)
        kv = span.empty_kv()
        await batcher.run(key, kv, np.array([[5, 6, 7]]), lambda out: None)
        for k in range(16):
            await batcher.run(key, kv, np.array([[9 + k]]), lambda out: None)
            await asyncio.sleep(0.01)
            if k == 3:
                started.append(1)
                if len(started) == 4:  # every stream past its first steps: the merge is over
                    marks["start"] = dict(batcher.stats.decode_batches)
        marks.setdefault("end", dict(batcher.stats.decode_batches))  # the first stream ends
        live.discard(key)
        batcher.forget(key)

    try:
        await asyncio.gather(stream("a", 0.0), stream("b", 0.015), stream("c", 0.03),
                             stream("d", 0.03))  # fmt: skip
    finally:
        executor.shutdown()
    between = {rows: n - marks["start"].get(rows, 0) for rows, n in marks["end"].items()}
    print(f"decode runs by rows: all {batcher.stats.decode_batches}, in between {between}")
    assert {rows: n for rows, n in between.items() if n} == {2: between[2]}, between
    assert between[2] >= 10, between


async def test_two_halves_of_the_streams_merge_into_one_batch() -> None:
    """Streams whose next step comes back later than ``gather_s`` (but within a quarter of a
    run) would split into two halves that alternate for good, each arriving while the other
    runs; the batch waits for the rows of the last two runs, so the halves merge."""
    from concurrent.futures import ThreadPoolExecutor

    from runtime.decoder_load import load_decoder_span
    from runtime.package import open_package
    from runtime.step_batcher import StepBatcher

    package = open_package(shared_tiny_package(), "tiny-llm")
    span = load_decoder_span(package, SETTINGS, 0, LAYERS - 1)
    executor = ThreadPoolExecutor(1)
    batcher = StepBatcher(span, executor, max_rows=16, gather_s=0.001)

    def finish(out: np.ndarray) -> int:
        time.sleep(0.01)  # a run of 4 rows takes 40 ms: the client's 5 ms is a 1/8 of it
        return int(np.argmax(out[0]))

    async def stream(key: str, start_s: float) -> None:
        await asyncio.sleep(start_s)
        kv = span.empty_kv()
        token = await batcher.run(key, kv, np.array([[5, 6, 7]]), finish)
        for _ in range(30):
            await asyncio.sleep(0.005)  # the coordinator's and the client's share of a token
            token = await batcher.run(key, kv, np.array([[token]]), finish)

    try:
        await asyncio.gather(*(stream(f"a{i}", 0.0) for i in range(4)),
                             *(stream(f"b{i}", 0.015) for i in range(4)))  # fmt: skip
    finally:
        executor.shutdown()
    runs = batcher.stats.decode_batches
    print(f"decode runs by rows: {dict(sorted(runs.items()))}")
    assert runs.get(8, 0) >= 15, runs  # without the wait: runs of 1 and 7 rows alternating


async def decode_runs_while_prompts_start(turn_tokens: int) -> tuple[int, int]:
    """8 prompts of 20 tokens arrive together while 2 streams decode: the decode runs between
    the first prompt's first token and the last's, and the most decode runs seen in a row."""
    from concurrent.futures import ThreadPoolExecutor

    from runtime.decoder_load import load_decoder_span
    from runtime.package import open_package
    from runtime.step_batcher import StepBatcher

    package = open_package(shared_tiny_package(), "tiny-llm")
    span = load_decoder_span(package, SETTINGS, 0, LAYERS - 1)
    executor = ThreadPoolExecutor(1)
    batcher = StepBatcher(span, executor, max_rows=16, prefill_turn_tokens=turn_tokens)

    def finish(out: np.ndarray) -> int:
        return int(np.argmax(out[0]))

    def runs() -> int:
        return sum(batcher.stats.decode_batches.values())

    done = asyncio.Event()

    async def decoding(key: str) -> None:
        kv = span.empty_kv()
        token = await batcher.run(key, kv, np.array([[5, 6, 7]]), finish)
        while not done.is_set():
            token = await batcher.run(key, kv, np.array([[token]]), finish)

    started: list[int] = []  # the decode runs so far when each prompt's first token came

    try:
        streams = [asyncio.create_task(decoding(f"d{i}")) for i in range(2)]
        while runs() < 3:
            await asyncio.sleep(0.001)
        rng = np.random.default_rng(1)
        futures = [batcher.submit(f"p{i}", span.empty_kv(), rng.integers(3, 300, size=(1, 20)),
                                  finish) for i in range(8)]  # fmt: skip
        for future in futures:
            future.add_done_callback(lambda _: started.append(runs()))
        await asyncio.gather(*futures)
        done.set()
        await asyncio.gather(*streams)
    finally:
        executor.shutdown()
    return max(started) - min(started), len(started)


async def test_prompts_that_arrive_together_start_decoding_together() -> None:
    """One chunk of each waiting prompt runs between two decode batches (up to
    prefill_turn_tokens): 8 prompts of 20 tokens take one turn, not 8 decode runs' time."""
    together, count = await decode_runs_while_prompts_start(256)
    one_by_one, _ = await decode_runs_while_prompts_start(1)
    print(f"decode runs between the first and last of {count} prompts: {together} with a "
          f"256-token turn, {one_by_one} one chunk per turn")  # fmt: skip
    assert together == 0
    assert one_by_one >= 6  # a decode run of the others between each two prompts
