"""Decode batches keep their presents between steps (runtime/batch_kv.py), on the real tiny
generation package: the same rows in any order reuse them with no gather, a row that leaves is
copied out, one that joins is gathered in, and every row's logits equal its run alone. Each test
runs twice: with plain runs, and through IO binding (the presents kept as onnxruntime's values,
as on CUDA), against runs alone without it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from runtime import batch_kv
from runtime.decoder import DecoderSpan, SequenceKV
from runtime.decoder_load import load_decoder_span
from runtime.package import open_package
from runtime.session import CUDA, SessionSettings
from runtime.step_batcher import truncate
from tests.support.tiny_llm import KV_HEADS, shared_tiny_package

SETTINGS = SessionSettings(device="cpu", intra_op_threads=1)
PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11, 64], [8, 120, 33, 2], [300, 1, 77, 45, 46, 47], [9, 9]]


@pytest.fixture(scope="module", params=["off", "on"], ids=["plain-runs", "io-binding"])
def span(request: pytest.FixtureRequest) -> DecoderSpan:
    package = open_package(shared_tiny_package(), "tiny-llm")
    settings = SessionSettings(device="cpu", intra_op_threads=1, decode_io_binding=request.param)
    loaded = load_decoder_span(package, settings, 0, len(package.segments) - 1)
    assert loaded.io_binding == (request.param == "on")
    return loaded


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
    """Logits of one sequence stepped by itself, with plain runs: after its prompt, then after
    each feed."""
    bound, span.io_binding = span.io_binding, False
    try:
        kv = span.empty_kv()
        out = [span.step([kv], np.array([prompt]))[0]]
        out += [span.step([kv], np.array([[token]]))[0] for token in feeds]
    finally:
        span.io_binding = bound
    return out


def _prefilled(span: DecoderSpan, count: int) -> list[SequenceKV]:
    """``count`` sequences, each with its prompt of PROMPTS run alone."""
    kvs = [span.empty_kv() for _ in range(count)]
    for kv, prompt in zip(kvs, PROMPTS, strict=False):
        span.step([kv], np.array([prompt]))
    return kvs


def test_the_same_rows_in_any_order_reuse_the_batch_and_match_their_runs_alone(
    span: DecoderSpan, gathers: list[int]
) -> None:
    feeds = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25], [31, 32, 33, 34, 35]]
    want = [_alone(span, p, f) for p, f in zip(PROMPTS, feeds, strict=False)]
    kvs = _prefilled(span, len(feeds))
    assert gathers == []  # a prompt feeds its empty KV as it is
    orders = [[0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 2, 1], [2, 1, 0]]
    for step, order in enumerate(orders):
        rows = [kvs[i] for i in order]
        logits = span.step(rows, np.array([[feeds[i][step]] for i in order]))
        for got, i in zip(logits, order, strict=True):
            np.testing.assert_allclose(got, want[i][step + 1], atol=1e-4, rtol=0)
        assert len({id(kv.batch) for kv in kvs}) == 1  # one batch holds all three
    assert gathers == [3]  # only the first decode step gathered: the rest reused the presents
    batch = kvs[0].batch
    assert batch is not None and (batch.resident is not None) == span.io_binding
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
        kvs = _prefilled(span, len(feeds))
        for step in range(3):
            logits = span.step(kvs, np.array([[f[step]] for f in feeds]))
            for row in range(2):
                np.testing.assert_allclose(logits[row], want[row][step + 1], atol=1e-4, rtol=0)
            assert all(kv.batch is None for kv in kvs)
    finally:
        span.keep_batches = True
    assert gathers == [2, 2, 2]


def test_with_io_binding_a_batch_stays_in_onnxruntime_values_until_a_row_is_read() -> None:
    """The same rows step on their last run's OrtValues, never copied to the host; the first
    read of a row's tokens (a row leaving the batch) makes the batch's one host copy."""
    package = open_package(shared_tiny_package(), "tiny-llm")
    settings = SessionSettings(device="cpu", intra_op_threads=1, decode_io_binding="on")
    span = load_decoder_span(package, settings, 0, len(package.segments) - 1)
    feeds = [[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]]
    want = [_alone(span, p, f) for p, f in zip(PROMPTS, feeds, strict=False)]
    kvs = _prefilled(span, len(feeds))
    for step in range(3):
        logits = span.step(kvs, np.array([[f[step]] for f in feeds]))
        for row in range(3):
            np.testing.assert_allclose(logits[row], want[row][step + 1], atol=1e-4, rtol=0)
        batch = kvs[0].batch
        assert batch is not None and batch.resident is not None
        assert type(batch.resident[0][0]).__name__ == "OrtValue"
        if step:  # fed its own OrtValues: nothing read back to the host
            assert batch._host is None
        assert [kv.nbytes() for kv in kvs] == [span.kv_bytes_per_token * kv.length for kv in kvs]
        assert batch._host is None  # sizes come from the shapes
    last = kvs[0].batch
    assert last is not None
    span.step(kvs[:2], np.array([[f[3]] for f in feeds[:2]]))  # row 2 leaves: copied out
    assert last._host is not None and kvs[2].batch is None
    assert kvs[2].keys[0].shape == (1, KV_HEADS, kvs[2].length, 16)
    logits = span.step([kvs[2]], np.array([[feeds[2][3]]]))
    np.testing.assert_allclose(logits[0], want[2][4], atol=1e-4, rtol=0)


def test_io_binding_follows_the_setting_and_the_device() -> None:
    package = open_package(shared_tiny_package(), "tiny-llm")
    last = len(package.segments) - 1
    for setting, want in (("auto", False), ("on", True), ("off", False)):  # auto: CUDA only
        settings = SessionSettings(device="cpu", intra_op_threads=1, decode_io_binding=setting)  # type: ignore[arg-type]
        assert load_decoder_span(package, settings, 0, last).io_binding is want


@pytest.mark.gpu
@pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="needs onnxruntime-gpu")
def test_on_cuda_a_decode_batch_keeps_its_kv_in_gpu_memory_and_matches_cpu() -> None:
    package = open_package(shared_tiny_package(), "tiny-llm")
    last = len(package.segments) - 1
    gpu = load_decoder_span(package, SessionSettings(device="cuda"), 0, last)
    cpu = load_decoder_span(package, SETTINGS, 0, last)
    assert gpu.device == "cuda" and gpu.io_binding  # auto: on where CUDA was obtained
    feeds = [[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]]
    rows = {name: [span.empty_kv() for _ in feeds] for name, span in (("gpu", gpu), ("cpu", cpu))}
    for name, span in (("gpu", gpu), ("cpu", cpu)):
        for kv, prompt in zip(rows[name], PROMPTS, strict=False):
            span.step([kv], np.array([prompt]))
    for step in range(4):
        ids = np.array([[f[step]] for f in feeds])
        got, want = gpu.step(rows["gpu"], ids), cpu.step(rows["cpu"], ids)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
        batch = rows["gpu"][0].batch
        assert batch is not None and batch.resident is not None and batch._host is None
        assert {v.device_name().lower() for v in (*batch.resident[0], *batch.resident[1])} == {
            "cuda"
        }
