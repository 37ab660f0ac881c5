"""DecoderSpan over a real tiny generation package: chaining, merging, batches, typed errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporter.decoder_verify import DecoderChain
from runtime.decoder import DecoderSpan, SequenceKV
from runtime.decoder_load import load_decoder_span
from runtime.errors import (
    ContextOverflow,
    InputMismatch,
    InvalidRequest,
    ModelLoadError,
    ShapeMismatch,
)
from runtime.package import PackageRef, open_package
from runtime.session import SessionSettings, create_session
from tests.support.tiny_llm import HIDDEN, KV_HEADS, LAYERS, shared_tiny_package

SETTINGS = SessionSettings(device="cpu", intra_op_threads=1)
PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11, 64], [8, 120, 33, 2], [300, 1, 77, 45, 46, 47]]
DECODE_STEPS = 6


@pytest.fixture(scope="session")
def tiny_package() -> PackageRef:
    return open_package(shared_tiny_package(), "tiny-llm")


def _single_run(chain: DecoderChain, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """Greedy: the logits of every step of one unpadded sequence, and the tokens chosen."""
    kvs = chain.new_sequences(1)
    logits = [chain.step(kvs, np.array([prompt]))[0]]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(chain.step(kvs, np.array([[tokens[-1]]]))[0])
    return np.stack(logits), tokens


def test_chained_single_segment_spans_equal_one_span(tiny_package: PackageRef) -> None:
    count = len(tiny_package.segments)
    assert count == LAYERS  # one layer per segment by default
    chained = DecoderChain([load_decoder_span(tiny_package, SETTINGS, k, k) for k in range(count)])
    whole = load_decoder_span(tiny_package, SETTINGS, 0, count - 1)
    assert whole.session_count == 1 and whole.is_first and whole.is_last  # merged at load
    unmerged = load_decoder_span(tiny_package, SETTINGS, 0, count - 1, merge=False)
    assert unmerged.session_count == count
    want, tokens = _single_run(DecoderChain([whole]), PROMPTS[0], DECODE_STEPS)
    for runner in (chained, DecoderChain([unmerged])):
        got, got_tokens = _single_run(runner, PROMPTS[0], DECODE_STEPS)
        assert got_tokens == tokens
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_two_span_padded_batch_equals_single_runs(tiny_package: PackageRef) -> None:
    chain = DecoderChain(
        [load_decoder_span(tiny_package, SETTINGS, a, b) for a, b in [[0, 1], [2, 3]]]
    )
    singles = [_single_run(chain, p, DECODE_STEPS) for p in PROMPTS]
    longest = max(map(len, PROMPTS))
    ids = np.zeros((len(PROMPTS), longest), np.int64)
    for row, prompt in enumerate(PROMPTS):
        ids[row, longest - len(prompt) :] = prompt
    kvs = chain.new_sequences(len(PROMPTS))
    batch = [chain.step(kvs, ids, [len(p) for p in PROMPTS])]
    for step in range(DECODE_STEPS):
        feed = np.array([[tokens[step]] for _, tokens in singles])
        batch.append(chain.step(kvs, feed))
    for row, (want, _) in enumerate(singles):
        got = np.stack([b[row] for b in batch])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        # each row keeps its own real tokens only: prompt + decoded tokens
        for span_kvs in kvs:
            assert span_kvs[row].length == len(PROMPTS[row]) + DECODE_STEPS
            assert span_kvs[row].keys[0].shape == (1, KV_HEADS, span_kvs[row].length, 16)


def test_rows_with_different_pasts_join_one_step(tiny_package: PackageRef) -> None:
    """Sequences prefilled apart (continuous batching) step together, and match."""
    chain = DecoderChain([load_decoder_span(tiny_package, SETTINGS, 0, 3)])
    singles = [_single_run(chain, p, 1) for p in PROMPTS[:2]]
    kvs_a, kvs_b = chain.new_sequences(1), chain.new_sequences(1)
    chain.step(kvs_a, np.array([PROMPTS[0]]))
    chain.step(kvs_b, np.array([PROMPTS[1]]))
    joined = [[kvs_a[0][0], kvs_b[0][0]]]
    logits = chain.step(joined, np.array([[singles[0][1][0]], [singles[1][1][0]]]))
    for row, (want, _) in enumerate(singles):
        np.testing.assert_allclose(logits[row], want[1], atol=1e-4, rtol=0)


def test_batch_of_one_keeps_the_graph_outputs(tiny_package: PackageRef) -> None:
    span = load_decoder_span(tiny_package, SETTINGS, 0, 1)
    kv = span.empty_kv()
    hidden = span.step([kv], np.array([PROMPTS[1]]))
    assert hidden.shape == (1, len(PROMPTS[1]), HIDDEN)
    assert kv.length == len(PROMPTS[1])
    held = kv.keys[0]
    span.step([kv], np.array([[3]]))
    assert kv.keys[0] is not held and kv.keys[0].shape == (1, KV_HEADS, kv.length, 16)
    assert kv.nbytes() == span.kv_bytes_per_token * kv.length
    assert span.kv_bytes_per_token == 2 * 2 * KV_HEADS * 16 * 4


def test_wrong_inputs_are_typed_errors(tiny_package: PackageRef) -> None:
    first = load_decoder_span(tiny_package, SETTINGS, 0, 1)
    second = load_decoder_span(tiny_package, SETTINGS, 2, 3)
    with pytest.raises(ShapeMismatch, match=r"expected \[batch, tokens, 64\]"):
        second.step([second.empty_kv()], np.zeros((1, 3, HIDDEN + 1), np.float32))
    with pytest.raises(ShapeMismatch, match=r"expected \[batch, tokens\]"):
        first.step([first.empty_kv()], np.zeros((1, 3, 2), np.int64))
    with pytest.raises(InputMismatch, match="integer dtype"):
        first.step([first.empty_kv()], np.zeros((1, 3), np.float32))
    with pytest.raises(InputMismatch, match="must be FP32"):
        second.step([second.empty_kv()], np.zeros((1, 3, HIDDEN), np.float64))
    with pytest.raises(InvalidRequest, match="give one per row"):
        first.step([first.empty_kv()], np.zeros((2, 3), np.int64))
    twice = first.empty_kv()
    with pytest.raises(InvalidRequest, match="appears twice"):
        first.step([twice, twice], np.zeros((2, 3), np.int64))
    with pytest.raises(InvalidRequest, match="new_tokens"):
        first.step([first.empty_kv()], np.zeros((1, 3), np.int64), [4])
    foreign = SequenceKV([np.zeros((1, KV_HEADS, 0, 16), np.float32)], [], 0)
    with pytest.raises(InvalidRequest, match="this span has 2"):
        first.step([foreign], np.zeros((1, 3), np.int64))
    wide = first.empty_kv()
    wide.keys[0] = wide.keys[0].astype(np.float64)
    with pytest.raises(InputMismatch, match="float64 arrays"):
        first.step([wide], np.zeros((1, 3), np.int64))
    lying = first.empty_kv()
    lying.length = 5  # says 5 tokens, holds none
    with pytest.raises(ShapeMismatch, match="expected"):
        first.step([lying], np.zeros((1, 1), np.int64))
    context = tiny_package.manifest.generation.context_length  # type: ignore[union-attr]
    with pytest.raises(ContextOverflow, match=f"context length is {context}"):
        first.step([first.empty_kv()], np.zeros((1, context + 1), np.int64))


def test_spans_are_checked_at_load(tiny_package: PackageRef) -> None:
    with pytest.raises(ModelLoadError, match="outside"):
        load_decoder_span(tiny_package, SETTINGS, 2, 9)
    segments = tiny_package.segments
    generation = tiny_package.manifest.generation  # type: ignore[union-attr]
    assert generation is not None
    sessions = [create_session(tiny_package.folder / s.file, SETTINGS) for s in segments[:3]]
    with pytest.raises(ModelLoadError, match="not consecutive"):
        DecoderSpan([sessions[0], sessions[2]], [segments[0], segments[2]], generation)
    with pytest.raises(ModelLoadError, match="the sessions hold layers"):
        DecoderSpan(sessions[:1], segments[:2], generation)


def test_a_single_pass_package_is_refused(tmp_path: Path) -> None:
    from tests.models import dense_model, put_model

    put_model(tmp_path, "dense", dense_model())
    with pytest.raises(ModelLoadError, match="needs a generation package"):
        load_decoder_span(open_package(tmp_path, "dense"), SETTINGS, 0, 0)
