"""The coordinator's hop batcher: requests queued behind busy hops leave together."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from appliance.coordinator.hop_batcher import HopBatcher
from appliance.errors import NoLiveReplica, UpstreamError
from runtime.deadline import Deadline
from runtime.errors import DeadlineExceeded, Overloaded

Tensors = dict[str, np.ndarray]


class Ring:
    """A stand-in for the ring: doubles its input after a pause it controls."""

    def __init__(self, bad_value: float | None = None, error: Exception | None = None) -> None:
        self.calls: list[tuple[int, str]] = []
        self.deadlines: list[Deadline] = []
        self.release = asyncio.Event()
        self.bad_value = bad_value
        self.error = error

    async def send(self, inputs: Tensors, request_id: str, deadline: Deadline) -> Tensors:
        self.deadlines.append(deadline)
        x = inputs["x"]
        self.calls.append((x.shape[0], request_id))
        await self.release.wait()
        if self.error is not None:
            raise self.error
        if self.bad_value is not None and (x == self.bad_value).any():
            raise UpstreamError(400, "value out of range")
        return {"y": x * 2, "n": np.full((x.shape[0],), x.shape[0])}


def later(seconds: float = 30.0) -> Deadline:
    return Deadline.after(seconds)


def row(value: float, width: int = 3) -> Tensors:
    return {"x": np.full((1, width), value, np.float32)}


async def test_a_lone_request_leaves_at_once() -> None:
    ring = Ring()
    ring.release.set()
    batcher = HopBatcher(ring.send, max_rows=32, max_in_flight=1)
    out = await batcher.infer(row(1.0), "r1", later())
    assert ring.calls == [(1, "r1")]
    np.testing.assert_array_equal(out["y"], np.full((1, 3), 2.0))


async def test_requests_queued_behind_a_busy_hop_leave_as_one() -> None:
    ring = Ring()
    batcher = HopBatcher(ring.send, max_rows=32, max_in_flight=1)
    tasks = [asyncio.create_task(batcher.infer(row(float(i)), f"r{i}", later())) for i in range(11)]
    await asyncio.sleep(0.01)
    assert ring.calls == [(1, "r0")] and batcher.queued == 10
    ring.release.set()
    results = await asyncio.gather(*tasks)
    assert ring.calls == [(1, "r0"), (10, "r1+9")]
    for i, out in enumerate(results):  # every request gets its own rows back
        np.testing.assert_array_equal(out["y"], np.full((1, 3), 2.0 * i))
        assert out["n"].tolist() == [1 if i == 0 else 10]
    assert batcher.hops == 2 and batcher.rows_sent == 11


async def test_batches_respect_max_rows_and_only_join_like_inputs() -> None:
    ring = Ring()
    batcher = HopBatcher(ring.send, max_rows=4, max_in_flight=1)
    first = asyncio.create_task(batcher.infer(row(0.0), "a", later()))
    await asyncio.sleep(0)
    others = [batcher.infer(row(1.0), f"b{i}", later()) for i in range(6)]
    others += [batcher.infer(row(1.0, width=5), f"w{i}", later()) for i in range(2)]
    gathered = asyncio.gather(*others)
    await asyncio.sleep(0.01)
    ring.release.set()
    await asyncio.gather(first, gathered)
    assert [rows for rows, _ in ring.calls] == [1, 4, 2, 2]


async def test_a_batch_refused_as_bad_input_is_retried_one_by_one() -> None:
    ring = Ring(bad_value=7.0)
    batcher = HopBatcher(ring.send, max_rows=32, max_in_flight=1)
    first = asyncio.create_task(batcher.infer(row(0.0), "a", later()))
    await asyncio.sleep(0)
    values = [1.0, 7.0, 2.0]
    waiting = [asyncio.create_task(batcher.infer(row(v), f"v{v}", later())) for v in values]
    await asyncio.sleep(0.01)
    ring.release.set()
    await first
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(results[1], UpstreamError) and results[1].status == 400
    np.testing.assert_array_equal(results[0]["y"], np.full((1, 3), 2.0))  # type: ignore[index]
    np.testing.assert_array_equal(results[2]["y"], np.full((1, 3), 4.0))  # type: ignore[index]
    assert [rows for rows, _ in ring.calls] == [1, 3, 1, 1, 1]


async def test_a_ring_failure_fails_the_whole_batch_with_its_error() -> None:
    ring = Ring(error=NoLiveReplica("no replica of span 0-5 answered"))
    batcher = HopBatcher(ring.send, max_rows=32, max_in_flight=1)
    tasks = [asyncio.create_task(batcher.infer(row(1.0), f"r{i}", later())) for i in range(4)]
    await asyncio.sleep(0.01)
    ring.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, NoLiveReplica) for r in results)
    assert [rows for rows, _ in ring.calls] == [1, 3]  # not retried one by one


async def test_a_cancelled_request_leaves_the_queue_and_the_rest_are_served() -> None:
    ring = Ring()
    batcher = HopBatcher(ring.send, max_rows=32, max_in_flight=1)
    first = asyncio.create_task(batcher.infer(row(0.0), "a", later()))
    await asyncio.sleep(0)
    gone = asyncio.create_task(batcher.infer(row(1.0), "gone", later()))
    kept = asyncio.create_task(batcher.infer(row(2.0), "kept", later()))
    await asyncio.sleep(0.01)
    gone.cancel()
    ring.release.set()
    await first
    np.testing.assert_array_equal((await kept)["y"], np.full((1, 3), 4.0))
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert [rows for rows, _ in ring.calls] == [1, 1]


async def test_a_queue_of_only_cancelled_requests_is_emptied() -> None:
    ring = Ring()
    batcher = HopBatcher(ring.send, max_rows=32, max_in_flight=1)
    first = asyncio.create_task(batcher.infer(row(0.0), "a", later()))
    await asyncio.sleep(0)
    gone = [asyncio.create_task(batcher.infer(row(1.0), f"g{i}", later())) for i in range(3)]
    await asyncio.sleep(0.01)
    for task in gone:  # clients that hung up (wrk stopping, a timeout)
        task.cancel()
    ring.release.set()
    await asyncio.wait_for(first, 5)  # the loop is not stuck pumping an all-cancelled queue
    assert batcher.queued == 0
    assert await asyncio.wait_for(batcher.infer(row(3.0), "later", later()), 5)


async def test_the_queue_is_bounded_with_a_503_that_says_why() -> None:
    ring = Ring()
    batcher = HopBatcher(ring.send, max_rows=32, max_in_flight=1, max_queued=3, name="demo")
    tasks = [asyncio.create_task(batcher.infer(row(1.0), f"r{i}", later())) for i in range(4)]
    await asyncio.sleep(0.01)  # one in flight, three queued: the queue is full
    with pytest.raises(Overloaded, match="demo: 3 requests wait for the ring, the limit is 3"):
        await batcher.infer(row(1.0), "one too many", later())
    ring.release.set()
    assert len(await asyncio.gather(*tasks)) == 4


async def test_a_request_queued_past_its_deadline_fails_and_a_batch_keeps_the_earliest() -> None:
    ring = Ring()
    batcher = HopBatcher(ring.send, max_rows=32, max_in_flight=1)
    first = asyncio.create_task(batcher.infer(row(0.0), "a", later()))
    await asyncio.sleep(0)
    expiring = asyncio.create_task(batcher.infer(row(1.0), "soon", later(0.05)))
    kept = [asyncio.create_task(batcher.infer(row(2.0), f"k{i}", later(10 + i))) for i in range(2)]
    await asyncio.sleep(0.1)  # "soon" is past its deadline while still queued
    ring.release.set()
    await first
    with pytest.raises(DeadlineExceeded, match="soon waited past its deadline"):
        await expiring
    await asyncio.gather(*kept)
    assert [rows for rows, _ in ring.calls] == [1, 2]
    assert ring.deadlines[1] == min(ring.deadlines[1:])  # the earlier of the two
    assert ring.deadlines[1].remaining() < 10.5
