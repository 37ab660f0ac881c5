"""Alone sessions (runtime/decoder_load.py): a CPU span holding part of a model loads its
sessions a second time with more threads and runs on them the steps that hold every open
sequence; they answer as the span's own sessions do (real onnxruntime, the tiny Llama)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from runtime.decoder_load import load_decoder_span, wants_alone_sessions
from runtime.package import open_package
from runtime.session import SessionSettings
from runtime.step_batcher import StepBatcher
from tests.support.tiny_llm import LAYERS, shared_tiny_package

ALONE = SessionSettings(device="cpu", intra_op_threads=1, alone_intra_op_threads=2)


def threads(session: object) -> int:
    return int(session.session.get_session_options().intra_op_num_threads)  # type: ignore[attr-defined]


def test_a_span_holding_part_of_a_model_loads_alone_sessions_with_more_threads() -> None:
    package = open_package(shared_tiny_package(), "tiny-llm")
    span = load_decoder_span(package, ALONE, 0, LAYERS // 2 - 1)
    assert span.has_alone_sessions and span.session_sets == 2
    assert [threads(s) for s in span.alone_sessions] == [2] * span.session_count
    whole = load_decoder_span(package, ALONE, 0, LAYERS - 1)
    assert not whole.has_alone_sessions and whole.session_sets == 1  # no chain to wait on
    for settings in (
        SessionSettings(device="cpu", intra_op_threads=2, alone_intra_op_threads=2),
        SessionSettings(device="cpu", intra_op_threads=1),
    ):
        assert not wants_alone_sessions(span, settings), settings  # no more threads: none
        assert not load_decoder_span(package, settings, 0, LAYERS // 2 - 1).has_alone_sessions


def test_steps_on_the_alone_sessions_answer_as_on_the_spans_own() -> None:
    """Both halves of the model, prompts of different lengths, then decode steps: each step
    once on each set of sessions from equal KV; outputs and KV within fp32 noise, and a KV
    grown on one set continues on the other."""
    package = open_package(shared_tiny_package(), "tiny-llm")
    rng = np.random.default_rng(5)
    for first, last in ((0, LAYERS // 2 - 1), (LAYERS // 2, LAYERS - 1)):
        span = load_decoder_span(package, ALONE, first, last)
        assert span.has_alone_sessions
        plain, alone = [span.empty_kv() for _ in range(3)], [span.empty_kv() for _ in range(3)]
        for count in (7, 3, 11):  # each prompt alone, as a prefill runs
            x = (rng.integers(3, 300, (1, count)) if span.is_first
                 else rng.standard_normal((1, count, 64)).astype(np.float32))  # fmt: skip
            index = (7, 3, 11).index(count)
            a = span.step([plain[index]], x)
            b = span.step([alone[index]], x, alone=True)
            np.testing.assert_allclose(b, a, atol=1e-5)
        for k in range(4):  # decode batches of the three rows; the last one crosses sets
            x = (rng.integers(3, 300, (3, 1)) if span.is_first
                 else rng.standard_normal((3, 1, 64)).astype(np.float32))  # fmt: skip
            a = span.step(plain, x)
            b = span.step(alone, x, alone=k < 3)
            np.testing.assert_allclose(b, a, atol=1e-5)
        for p, q in zip(plain, alone, strict=True):
            assert p.length == q.length
            for kp, kq in zip(p.keys, q.keys, strict=True):
                np.testing.assert_allclose(np.asarray(kq), np.asarray(kp), atol=1e-5)


async def run_streams(
    live_count: int, cohorts: int, gather_s: float = 0.0
) -> tuple[int, dict[int, int], int]:
    """``live_count`` streams open together on the first half, each a prompt then 8 steps:
    (runs on the alone sessions, decode runs by rows, prompt chunks)."""
    package = open_package(shared_tiny_package(), "tiny-llm")
    span = load_decoder_span(package, ALONE, 0, LAYERS // 2 - 1)
    executor = ThreadPoolExecutor(1)
    keys = [f"s{i}" for i in range(live_count)]
    live = set(keys)
    batcher = StepBatcher(span, executor, max_rows=16, gather_s=gather_s, cohorts=cohorts,
                          active=lambda: len(live))  # fmt: skip

    async def stream(key: str) -> None:
        kv = span.empty_kv()
        await batcher.run(key, kv, np.array([[5, 6, 7, 8]]), lambda out: None)
        for k in range(8):
            await batcher.run(key, kv, np.array([[9 + k]]), lambda out: None)
        live.discard(key)
        batcher.forget(key)

    try:
        await asyncio.gather(*(stream(key) for key in keys))
    finally:
        executor.shutdown()
    stats = batcher.stats
    return stats.alone_runs, dict(stats.decode_batches), stats.prefill_chunks


async def test_one_stream_runs_every_step_on_the_alone_sessions() -> None:
    alone, batches, chunks = await run_streams(1, cohorts=2)
    assert batches == {1: 8} and alone == 8 + chunks, (alone, batches, chunks)


async def test_streams_in_cohorts_never_take_the_alone_sessions() -> None:
    """Two streams on a span in 2 cohorts run as two batches of one: the chain's other spans
    compute the other cohort meanwhile, so each run keeps the node's own thread count."""
    alone, batches, _ = await run_streams(2, cohorts=2)
    assert alone == 0 and sum(batches.values()) >= 16, (alone, batches)


async def test_a_batch_of_every_open_sequence_takes_the_alone_sessions() -> None:
    """One cohort (decode_cohorts = 1; a gather, so that the two rows meet): the runs holding
    both rows go alone, any run of one row while the other stream is open does not."""
    alone, batches, _ = await run_streams(2, cohorts=1, gather_s=0.05)
    assert batches.get(2, 0) > 0 and alone >= batches[2], (alone, batches)
    assert alone <= batches[2] + 2, (alone, batches)  # a prompt after the other stream ended
