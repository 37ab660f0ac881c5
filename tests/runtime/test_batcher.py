"""The dynamic batcher with real onnxruntime sessions on tiny models."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.batcher import BatchSettings, DynamicBatcher, batch_key, select_batch, split_rows
from runtime.deadline import Deadline
from runtime.errors import DeadlineExceeded, InvalidRequest, Overloaded, RuntimeFailure
from runtime.package import load_span, open_package
from runtime.session import SessionSettings
from tests.models import dense_model, fixed_batch_model, put_model, sequence_model

CPU = SessionSettings(device="cpu", intra_op_threads=1)


def runner_for(tmp_path: Path, model, name: str = "m"):
    put_model(tmp_path, name, model)
    return load_span(open_package(tmp_path, name), CPU)


def test_select_batch_takes_matching_rows_in_order_up_to_the_limit() -> None:
    a, b = (("x", "<f4", (4,)),), (("x", "<f4", (5,)),)
    assert select_batch([a, b, a, a], [2, 1, 3, 4], 5) == [0, 2]
    assert select_batch([a, a, a], [1, 1, 1], 8) == [0, 1, 2]
    assert select_batch([b, a], [7, 1], 8) == [0]
    assert select_batch([], [], 4) == []


def test_split_rows_refuses_outputs_without_one_row_per_input_row() -> None:
    pieces = split_rows({"y": np.arange(6).reshape(3, 2)}, [1, 2])
    assert pieces[0]["y"].tolist() == [[0, 1]] and pieces[1]["y"].tolist() == [[2, 3], [4, 5]]
    with pytest.raises(RuntimeFailure, match="3 rows"):
        split_rows({"y": np.zeros((2, 2))}, [1, 2])


def test_batch_key_ignores_the_batch_dim_only() -> None:
    x = np.zeros((2, 4), np.float32)
    assert batch_key({"x": x}) == batch_key({"x": np.zeros((7, 4), np.float32)})
    assert batch_key({"x": x}) != batch_key({"x": np.zeros((2, 5), np.float32)})
    assert batch_key({"x": x}) != batch_key({"x": np.zeros((2, 4), np.float64)})


async def test_batched_results_equal_unbatched_results_exactly(tmp_path: Path) -> None:
    runner = runner_for(tmp_path, dense_model(features=4, units=3))
    rng = np.random.default_rng(1)
    requests = [rng.normal(size=(int(rng.integers(1, 5)), 4)).astype(np.float32) for _ in range(40)]
    alone = [runner.run({"x": x}) for x in requests]
    batcher = DynamicBatcher(
        runner.run, BatchSettings(32, 20_000, 100), batchable=runner.signature.batchable
    )
    try:
        results = await asyncio.gather(*(batcher.infer({"x": x}) for x in requests))
    finally:
        await batcher.close()
    assert batcher.stats.execution_count < len(requests)  # it really batched
    assert batcher.stats.inference_count == sum(len(x) for x in requests)
    for got, want in zip(results, alone, strict=True):
        np.testing.assert_array_equal(got["y"], want["y"])
        np.testing.assert_array_equal(got["s"], want["s"])


async def test_requests_of_different_shapes_each_get_their_own_rows(tmp_path: Path) -> None:
    runner = runner_for(tmp_path, sequence_model(hidden=8, vocab=50))
    rng = np.random.default_rng(2)
    requests = [
        rng.integers(0, 50, size=(int(rng.integers(1, 4)), int(rng.integers(1, 6)))).astype(
            np.int64
        )
        for _ in range(60)
    ]
    batcher = DynamicBatcher(runner.run, BatchSettings(8, 5_000, 100), batchable=True)
    try:
        results = await asyncio.gather(*(batcher.infer({"ids": ids}) for ids in requests))
    finally:
        await batcher.close()
    for ids, got in zip(requests, results, strict=True):
        np.testing.assert_array_equal(got["hidden"], runner.run({"ids": ids})["hidden"])


async def test_one_bad_request_does_not_fail_its_batch_neighbours(tmp_path: Path) -> None:
    runner = runner_for(tmp_path, sequence_model(hidden=4, vocab=10))
    batcher = DynamicBatcher(runner.run, BatchSettings(8, 20_000, 100), batchable=True)
    good = np.array([[1, 2, 3]], np.int64)
    bad = np.array([[1, 99, 3]], np.int64)  # token id outside the 10-row table
    try:
        results = await asyncio.gather(
            batcher.infer({"ids": good}), batcher.infer({"ids": bad}), return_exceptions=True
        )
    finally:
        await batcher.close()
    assert isinstance(results[1], InvalidRequest)
    assert isinstance(results[0], dict)
    np.testing.assert_array_equal(results[0]["hidden"], runner.run({"ids": good})["hidden"])


async def test_full_queue_is_overloaded_and_later_requests_still_run(tmp_path: Path) -> None:
    runner = runner_for(tmp_path, dense_model())
    batcher = DynamicBatcher(runner.run, BatchSettings(1, 0, 3), batchable=True)
    x = np.ones((1, 4), np.float32)
    try:
        results = await asyncio.gather(
            *(batcher.infer({"x": x}) for _ in range(10)), return_exceptions=True
        )
        overloaded = [r for r in results if isinstance(r, Overloaded)]
        assert overloaded and "limit is 3" in str(overloaded[0])
        assert sum(isinstance(r, dict) for r in results) >= 3
        again = await batcher.infer({"x": x})
        assert again["y"].shape == (1, 3)
    finally:
        await batcher.close()


async def test_oversized_batch_is_refused_with_the_limit(tmp_path: Path) -> None:
    runner = runner_for(tmp_path, dense_model())
    batcher = DynamicBatcher(runner.run, BatchSettings(4, 0, 10), batchable=True)
    try:
        with pytest.raises(InvalidRequest, match="max_batch_size 4"):
            await batcher.infer({"x": np.ones((5, 4), np.float32)})
    finally:
        await batcher.close()


async def test_model_without_batch_dim_runs_unbatched(tmp_path: Path) -> None:
    runner = runner_for(tmp_path, fixed_batch_model())
    assert not runner.signature.batchable
    batcher = DynamicBatcher(runner.run, BatchSettings(32, 10_000, 100), batchable=False)
    xs = [np.full((2, 3), i, np.float32) for i in range(5)]
    try:
        results = await asyncio.gather(*(batcher.infer({"x": x}) for x in xs))
    finally:
        await batcher.close()
    assert batcher.stats.execution_count == 5
    for i, got in enumerate(results):
        np.testing.assert_array_equal(got["y"], np.full((2, 3), 3 * i, np.float32))


async def test_expired_and_cancelled_requests_never_take_a_place_in_a_run(
    tmp_path: Path,
) -> None:
    runner = runner_for(tmp_path, dense_model())

    def slow_run(feeds, outputs):
        time.sleep(0.3)  # holds the session while the others queue
        return runner.run(feeds, outputs)

    batcher = DynamicBatcher(slow_run, BatchSettings(1, 0, 100), batchable=True)
    x = np.ones((1, 4), np.float32)
    try:
        first = asyncio.create_task(batcher.infer({"x": x}))
        await asyncio.sleep(0.05)  # the first one is running now
        cancelled = asyncio.create_task(batcher.infer({"x": x}))
        expiring = asyncio.create_task(batcher.infer({"x": x}, deadline=Deadline.after(0.1)))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        assert (await first)["y"].shape == (1, 3)
        with pytest.raises(DeadlineExceeded):
            await expiring
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert batcher.stats.inference_count == 1  # neither dead request was run
    finally:
        await batcher.close()


async def test_a_sequential_client_does_not_wait_out_the_queue_delay(tmp_path: Path) -> None:
    runner = runner_for(tmp_path, dense_model())
    batcher = DynamicBatcher(runner.run, BatchSettings(8, 500_000, 100), batchable=True)
    x = np.ones((1, 4), np.float32)
    try:
        started = time.monotonic()
        for _ in range(5):
            await batcher.infer({"x": x})
        assert time.monotonic() - started < 0.5  # 5 x 0.5 s if each waited for company
        # eight at once run together as soon as all eight are there
        await asyncio.gather(*(batcher.infer({"x": x}) for _ in range(8)))
        started = time.monotonic()
        await asyncio.gather(*(batcher.infer({"x": x}) for _ in range(8)))
        assert time.monotonic() - started < 0.4
        assert batcher.stats.batch_sizes[8].count >= 1
    finally:
        await batcher.close()


async def test_requested_outputs_only_are_returned(tmp_path: Path) -> None:
    runner = runner_for(tmp_path, dense_model())
    batcher = DynamicBatcher(runner.run, BatchSettings(8, 1_000, 100), batchable=True)
    x = np.ones((2, 4), np.float32)
    try:
        only_s, both = await asyncio.gather(batcher.infer({"x": x}, ["s"]), batcher.infer({"x": x}))
    finally:
        await batcher.close()
    assert set(only_s) == {"s"} and set(both) == {"y", "s"}
