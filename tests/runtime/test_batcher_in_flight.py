"""The dynamic batcher with ``runs_in_flight`` above 1: real onnxruntime sessions on tiny models,
each run wrapped to count how many are inside the session at once."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.batcher import BatchSettings, DynamicBatcher, Tensors
from runtime.deadline import Deadline
from runtime.errors import DeadlineExceeded, Overloaded
from runtime.package import SpanRunner, load_span, open_package
from runtime.session import SessionSettings
from tests.models import dense_model, put_model

CPU = SessionSettings(device="cpu", intra_op_threads=1)


def runner_for(tmp_path: Path) -> SpanRunner:
    put_model(tmp_path, "m", dense_model(features=4, units=3))
    return load_span(open_package(tmp_path, "m"), CPU)


class Counted:
    """A real session run that records how many runs are inside it at once, what each got,
    and optionally holds each run ``hold_s`` (so the queue fills behind the runs)."""

    def __init__(self, runner: SpanRunner, hold_s: float = 0.0) -> None:
        self.runner = runner
        self.hold_s = hold_s
        self.inside = 0
        self.most = 0
        self.batches: list[list[float]] = []  # the first column of each run's rows
        self.barrier: threading.Barrier | None = None
        self._lock = threading.Lock()

    def __call__(self, feeds: Tensors, outputs: list[str] | None) -> Tensors:
        with self._lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.batches.append(feeds["x"][:, 0].tolist())
        try:
            if self.barrier is not None:
                self.barrier.wait()  # breaks (raises) unless a second run comes in meanwhile
            time.sleep(self.hold_s)
            return self.runner.run(feeds, outputs)
        finally:
            with self._lock:
                self.inside -= 1


def rows(count: int) -> list[np.ndarray]:
    return [np.full((1, 4), float(i), np.float32) for i in range(count)]


async def test_two_runs_overlap_when_two_may_be_in_flight(tmp_path: Path) -> None:
    runner = runner_for(tmp_path)
    run = Counted(runner)
    run.barrier = threading.Barrier(2, timeout=10)  # each of the two waits for the other
    batcher = DynamicBatcher(run, BatchSettings(1, 0, 100, runs_in_flight=2), batchable=True)
    xs = rows(2)
    try:
        results = await asyncio.gather(*(batcher.infer({"x": x}) for x in xs))
    finally:
        await batcher.close()
    assert run.most == 2 and batcher.peak_runs == 2
    assert not run.barrier.broken
    for x, got in zip(xs, results, strict=True):
        np.testing.assert_array_equal(got["y"], runner.run({"x": x})["y"])


async def test_one_in_flight_never_overlaps(tmp_path: Path) -> None:
    """The same two requests with runs_in_flight = 1: the first run waits for a second that
    never comes in, so the barrier breaks and each request fails alone, never together."""
    runner = runner_for(tmp_path)
    run = Counted(runner)
    run.barrier = threading.Barrier(2, timeout=0.3)
    batcher = DynamicBatcher(run, BatchSettings(1, 0, 100, runs_in_flight=1), batchable=True)
    try:
        results = await asyncio.gather(
            *(batcher.infer({"x": x}) for x in rows(2)), return_exceptions=True
        )
    finally:
        await batcher.close()
    assert run.most == 1 and batcher.peak_runs == 1
    assert run.barrier.broken and all(isinstance(r, Exception) for r in results)


@pytest.mark.parametrize("in_flight", [1, 2, 3])
async def test_never_more_runs_than_allowed_and_every_row_comes_back(
    tmp_path: Path, in_flight: int
) -> None:
    runner = runner_for(tmp_path)
    run = Counted(runner, hold_s=0.02)
    settings = BatchSettings(4, 0, 100, runs_in_flight=in_flight)
    batcher = DynamicBatcher(run, settings, batchable=True)
    xs = rows(24)
    try:
        results = await asyncio.gather(*(batcher.infer({"x": x}) for x in xs))
    finally:
        await batcher.close()
    assert run.most == in_flight and batcher.peak_runs == in_flight  # 6 batches of 4 queued
    for x, got in zip(xs, results, strict=True):
        np.testing.assert_array_equal(got["y"], runner.run({"x": x})["y"])
    # batches take requests in queue order: 0-3, 4-7, ... (they may finish in any order)
    assert sorted(run.batches) == [[float(i) for i in range(s, s + 4)] for s in range(0, 24, 4)]
    stats = batcher.stats
    assert stats.inference_count == 24 and stats.execution_count == 6
    assert stats.success.count == 24 and stats.queue.count == 24 and stats.fail.count == 0
    assert batcher.running == 0 and batcher.outstanding == 0


async def test_a_queued_request_expires_on_time_while_every_slot_is_busy(tmp_path: Path) -> None:
    runner = runner_for(tmp_path)
    run = Counted(runner, hold_s=0.6)
    batcher = DynamicBatcher(run, BatchSettings(1, 0, 100, runs_in_flight=2), batchable=True)
    x = np.ones((1, 4), np.float32)
    try:
        busy = [asyncio.create_task(batcher.infer({"x": x})) for _ in range(2)]
        await asyncio.sleep(0.05)  # both slots run now
        assert batcher.running == 2
        cancelled = asyncio.create_task(batcher.infer({"x": x}))
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await batcher.infer({"x": x}, deadline=Deadline.after(0.1))
        assert time.monotonic() - started < 0.45  # failed at its deadline, not after the runs
        cancelled.cancel()
        for task in busy:
            assert (await task)["y"].shape == (1, 3)
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await asyncio.sleep(0.05)
        assert batcher.stats.inference_count == 2  # neither dead request was run
        assert batcher.stats.fail.count == 1
    finally:
        await batcher.close()


async def test_queue_limit_counts_waiting_requests_not_running_ones(tmp_path: Path) -> None:
    runner = runner_for(tmp_path)
    run = Counted(runner, hold_s=0.3)
    batcher = DynamicBatcher(run, BatchSettings(1, 0, 2, runs_in_flight=2), batchable=True)
    x = np.ones((1, 4), np.float32)
    try:
        running = [asyncio.create_task(batcher.infer({"x": x})) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert batcher.running == 2 and batcher.queue_depth == 0
        queued = [asyncio.create_task(batcher.infer({"x": x})) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="limit is 2"):
            await batcher.infer({"x": x})
        answers = await asyncio.gather(*running, *queued)
        assert all(a["y"].shape == (1, 3) for a in answers)
        assert run.most == 2
    finally:
        await batcher.close()


async def test_close_answers_the_runs_in_flight_and_fails_the_queued(tmp_path: Path) -> None:
    runner = runner_for(tmp_path)
    run = Counted(runner, hold_s=0.2)
    batcher = DynamicBatcher(run, BatchSettings(1, 0, 100, runs_in_flight=2), batchable=True)
    tasks = [asyncio.create_task(batcher.infer({"x": x})) for x in rows(5)]
    await asyncio.sleep(0.05)
    await batcher.close()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    answered = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert len(answered) == 2 and len(refused) == 3, results
    with pytest.raises(Overloaded, match="unloaded"):
        await batcher.infer({"x": rows(1)[0]})
