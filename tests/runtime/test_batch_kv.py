"""Decode batches keep their presents between steps (runtime/batch_kv.py), on the real tiny
generation package: the same rows in any order reuse them with no gather, a row that leaves is
copied out, one that joins is gathered in, and every row's logits equal its run alone."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import batch_kv
from runtime.decoder import DecoderSpan, SequenceKV, load_decoder_span
from runtime.package import open_package
from runtime.session import SessionSettings
from runtime.step_batcher import truncate
from tests.support.tiny_llm import KV_HEADS, shared_tiny_package

SETTINGS = SessionSettings(device="cpu", intra_op_threads=1)
PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11, 64], [8, 120, 33, 2], [300, 1, 77, 45, 46, 47], [9, 9]]


@pytest.fixture(scope="module")
def span() -> DecoderSpan:
    package = open_package(shared_tiny_package(), "tiny-llm")
    return load_decoder_span(package, SETTINGS, 0, len(package.segments) - 1)


@pytest.fixture
def gathers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The row count of every gather of pasts into fresh padded arrays."""
    seen: list[int] = []
    real = batch_kv.gather_past

    def counted(kvs: list[SequenceKV], *args: object) -> object:
        seen.append(len(kvs))
        return real(kvs, *args)  # type: ignore[arg-type]

    monkeypatch.setattr("runtime.decoder.gather_past", counted)
    return seen


def _alone(span: DecoderSpan, prompt: list[int], feeds: list[int]) -> list[np.ndarray]:
    """Logits of one sequence stepped by itself: after its prompt, then after each feed."""
    kv = span.empty_kv()
    out = [span.step([kv], np.array([prompt]))[0]]
    out += [span.step([kv], np.array([[token]]))[0] for token in feeds]
    return out


def test_the_same_rows_in_any_order_reuse_the_batch_and_match_their_runs_alone(
    span: DecoderSpan, gathers: list[int]
) -> None:
    feeds = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25], [31, 32, 33, 34, 35]]
    want = [_alone(span, p, f) for p, f in zip(PROMPTS, feeds, strict=False)]
    kvs = [span.empty_kv() for _ in feeds]
    for kv, prompt in zip(kvs, PROMPTS, strict=False):
        span.step([kv], np.array([prompt]))
    assert gathers == []  # a prompt feeds its empty KV as it is
    orders = [[0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 2, 1], [2, 1, 0]]
    for step, order in enumerate(orders):
        rows = [kvs[i] for i in order]
        logits = span.step(rows, np.array([[feeds[i][step]] for i in order]))
        for got, i in zip(logits, order, strict=True):
            np.testing.assert_allclose(got, want[i][step + 1], atol=1e-4, rtol=0)
        assert len({id(kv.batch) for kv in kvs}) == 1  # one batch holds all three
    assert gathers == [3]  # only the first decode step gathered: the rest reused the presents
    for kv, prompt in zip(kvs, PROMPTS, strict=False):
        assert kv.length == len(prompt) + len(orders)
        assert kv.keys[0].shape == (1, KV_HEADS, kv.length, 16)
        assert kv.nbytes() == span.kv_bytes_per_token * kv.length


def test_a_row_that_leaves_is_copied_out_and_one_that_joins_is_gathered_in(
    span: DecoderSpan, gathers: list[int]
) -> None:
    feeds = [[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34], [41, 42, 43, 44]]
    want = [_alone(span, p, f) for p, f in zip(PROMPTS, feeds, strict=True)]
    kvs = [span.empty_kv() for _ in feeds]
    for kv, prompt in zip(kvs, PROMPTS, strict=True):
        span.step([kv], np.array([prompt]))

    def step(rows: list[int], index: int) -> None:
        logits = span.step([kvs[i] for i in rows], np.array([[feeds[i][index]] for i in rows]))
        for got, i in zip(logits, rows, strict=True):
            np.testing.assert_allclose(got, want[i][index + 1], atol=1e-4, rtol=0)

    step([0, 1, 2], 0)
    first = kvs[0].batch
    held = [np.array(k) for k in kvs[2].keys]
    step([0, 1], 1)  # row 2 pauses (its step is late): it leaves the batch, copied out
    assert kvs[2].batch is None and kvs[0].batch is kvs[1].batch is not first
    for own, before in zip(kvs[2].keys, held, strict=True):
        assert own.flags.c_contiguous
        np.testing.assert_array_equal(own, before)
    step([2], 1)  # it catches up alone
    step([3], 0)  # row 3, prefilled apart, steps alone (its batch of one: no gather)
    step([3], 1)
    step([3, 2, 1, 0], 2)  # and joins the others
    step([0, 1, 2, 3], 3)
    assert gathers == [3, 2, 4]  # each change of rows gathered once (alone: its own arrays)
    assert len({id(kv.batch) for kv in kvs}) == 1


def test_a_closed_row_is_not_copied_and_truncate_leaves_the_batch(span: DecoderSpan) -> None:
    kvs = [span.empty_kv() for _ in range(3)]
    for kv, prompt in zip(kvs, PROMPTS, strict=False):
        span.step([kv], np.array([prompt]))
    span.step(kvs, np.array([[1], [2], [3]]))
    kvs[1].release()  # its sequence closed
    span.step([kvs[0], kvs[2]], np.array([[4], [5]]))
    assert kvs[1].batch is None and kvs[1].keys == []  # dropped, not copied
    length, other = kvs[0].length, kvs[2].length
    truncate(kvs[0], length - 2)
    assert kvs[0].batch is None and kvs[0].length == length - 2
    assert kvs[0].keys[0].shape == (1, KV_HEADS, length - 2, 16)
    assert kvs[2].batch is not None  # the other row stays where it was
    logits = span.step([kvs[0], kvs[2]], np.array([[6, 7], [8, 9]]))
    assert logits.shape[0] == 2 and kvs[0].length == length and kvs[2].length == other + 2


def test_with_batches_not_kept_every_step_gathers_and_rows_own_their_tokens(
    span: DecoderSpan, gathers: list[int]
) -> None:
    """The design before (the benchmark's side L0): the same logits, a gather every step."""
    feeds = [[11, 12, 13], [21, 22, 23]]
    want = [_alone(span, p, f) for p, f in zip(PROMPTS, feeds, strict=False)]
    span.keep_batches = False
    try:
        kvs = [span.empty_kv() for _ in feeds]
        for kv, prompt in zip(kvs, PROMPTS, strict=False):
            span.step([kv], np.array([prompt]))
        for step in range(3):
            logits = span.step(kvs, np.array([[f[step]] for f in feeds]))
            for row in range(2):
                np.testing.assert_allclose(logits[row], want[row][step + 1], atol=1e-4, rtol=0)
            assert all(kv.batch is None for kv in kvs)
    finally:
        span.keep_batches = True
    assert gathers == [2, 2, 2]
