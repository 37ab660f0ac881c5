"""The dynamic batcher: one queue per model and up to ``runs_in_flight`` session runs at once.

Requests whose non-batch dims and dtypes match are concatenated along axis 0, run once, and the
outputs are split back by row offsets. Runs happen on run threads (onnxruntime releases the GIL
and one session may run concurrently), so the event loop keeps decoding and encoding while a
batch computes. With ``runs_in_flight`` above 1 the next batch forms and starts while earlier
ones still run: batches start in queue order and may finish in any order (each request gets
its own rows back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from runtime.deadline import Deadline
from runtime.errors import DeadlineExceeded, InvalidRequest, Overloaded, RuntimeFailure
from runtime.stats import ModelStats

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
RunFn = Callable[[Tensors, list[str] | None], Tensors]
BatchKey = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int = 32  # rows per run; 1 turns batching off
    max_queue_delay_us: int = 2000  # how long the oldest request may wait for company
    max_queue_size: int = 512  # requests waiting; beyond it callers get Overloaded
    runs_in_flight: int = 1  # batches of one model running at once (each on its own thread)


class _Pending:
    __slots__ = ("inputs", "outputs", "rows", "key", "future", "deadline", "enqueued_ns")

    def __init__(
        self,
        inputs: Tensors,
        outputs: list[str] | None,
        rows: int,
        key: BatchKey,
        future: asyncio.Future[Tensors],
        deadline: Deadline | None,
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.rows = rows
        self.key = key
        self.future = future
        self.deadline = deadline
        self.enqueued_ns = time.perf_counter_ns()


def batch_key(inputs: Tensors) -> BatchKey:
    """What must match for two requests to share a run: names, dtypes and non-batch dims."""
    return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


def select_batch(keys: Sequence[BatchKey], rows: Sequence[int], max_rows: int) -> list[int]:
    """Indices (in queue order) of the requests to run together with the head of the queue.

    Takes every later request with the head's key while the rows fit, skipping others, so a
    request of another shape waits for a run of its own instead of blocking the queue.
    """
    if not keys:
        return []
    chosen, total = [0], rows[0]
    for index in range(1, len(keys)):
        if keys[index] == keys[0] and total + rows[index] <= max_rows:
            chosen.append(index)
            total += rows[index]
            if total == max_rows:
                break
    return chosen


def concat_rows(parts: Sequence[Tensors]) -> Tensors:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def split_rows(outputs: Tensors, rows: Sequence[int]) -> list[Tensors]:
    """Split batch outputs back into per-request pieces (views, no copies)."""
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise RuntimeFailure(
                f"output {name} has shape {list(array.shape)}; a batched model must return "
                f"{total} rows (one per input row)"
            )
    pieces, start = [], 0
    for count in rows:
        pieces.append({name: array[start : start + count] for name, array in outputs.items()})
        start += count
    return pieces


class DynamicBatcher:
    def __init__(
        self,
        run: RunFn,
        settings: BatchSettings,
        *,
        batchable: bool,
        name: str = "model",
        stats: ModelStats | None = None,
        observe: Callable[[float, float], None] | None = None,
    ) -> None:
        self._run = run
        self.settings = settings
        self.name = name
        self.batching = batchable and settings.max_batch_size > 1
        self.stats = stats or ModelStats()
        self._observe = observe  # (seconds queued, seconds computing) of each answered request
        self._queue: deque[_Pending] = deque()
        self.runs_in_flight = max(1, settings.runs_in_flight)
        self._executor = ThreadPoolExecutor(
            max_workers=self.runs_in_flight, thread_name_prefix=f"run-{name}"
        )
        self._wakeup: asyncio.Event | None = None  # a request came, or a run finished
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._runs: set[asyncio.Task[None]] = set()  # the runs' tasks, for close() to await
        self._running = 0  # runs in flight: a slot frees the moment a run's thread returns
        self._running_requests = 0  # requests in those runs
        self.peak_runs = 0  # the most runs seen in flight at once
        # Requests submitted and not yet answered, and the most seen at once: a client that
        # sends one request at a time should not wait for company that cannot come.
        self._outstanding = 0
        self._peak = 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def outstanding(self) -> int:
        """Requests submitted and not yet answered (queued or in a running batch)."""
        return self._outstanding

    @property
    def running(self) -> int:
        """Runs in flight now (at most runs_in_flight)."""
        return self._running

    def start(self) -> None:
        if self._worker is None:
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._work(), name=self.name)

    async def close(self) -> None:
        """Stop taking requests, fail the queued ones, and release the run threads.

        Runs in flight cannot be interrupted (onnxruntime owns their threads): they finish and
        answer their requests before the threads are released.
        """
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._runs:
            await asyncio.gather(*self._runs, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(Overloaded(f"model {self.name} is being unloaded"))
        self._executor.shutdown(wait=True)

    async def drain(self, timeout_s: float) -> None:
        """Stop taking requests, let the queued ones finish (bounded), then close."""
        self._closed = True
        end = time.monotonic() + timeout_s
        while (self._queue or self._running) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        await self.close()

    async def infer(
        self, inputs: Tensors, outputs: list[str] | None = None, deadline: Deadline | None = None
    ) -> Tensors:
        """Queue one request (any number of rows) and await its outputs.

        A request still queued past its ``deadline`` fails with DeadlineExceeded instead of
        running.
        """
        if self._closed:
            raise Overloaded(f"model {self.name} is being unloaded")
        if len(self._queue) >= self.settings.max_queue_size:
            raise Overloaded(
                f"model {self.name}: {len(self._queue)} requests queued, the limit is "
                f"{self.settings.max_queue_size}; retry later"
            )
        rows = _rows_of(inputs) if self.batching else 1
        if self.batching and rows > self.settings.max_batch_size:
            raise InvalidRequest(
                f"batch of {rows} rows exceeds max_batch_size {self.settings.max_batch_size} "
                f"of model {self.name}; send at most {self.settings.max_batch_size} rows"
            )
        self.start()
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        key = batch_key(inputs) if self.batching else ()
        self._queue.append(_Pending(inputs, outputs, rows, key, future, deadline))
        assert self._wakeup is not None
        self._wakeup.set()
        self._outstanding += 1
        self._peak = max(self._peak, self._outstanding)
        try:
            return await future  # a cancelled caller cancels the future: the worker skips it
        finally:
            self._outstanding -= 1

    async def _work(self) -> None:
        """Form batches in queue order and start each once a run slot is free."""
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            self._drop_finished()
            if not self._queue or self._running >= self.runs_in_flight:
                await self._sleep_until_due()
                continue
            if self.batching:
                await self._wait_for_company()
                self._drop_finished()
                if not self._queue:
                    continue
            batch = self._take_batch()
            self._running += 1
            self._running_requests += len(batch)
            self.peak_runs = max(self.peak_runs, self._running)
            run = loop.create_task(self._run_batch(batch), name=f"{self.name}-run")
            self._runs.add(run)
            run.add_done_callback(self._runs.discard)

    async def _sleep_until_due(self) -> None:
        """Until a request comes or a run finishes, waking in time to fail an expiring one."""
        assert self._wakeup is not None
        self._wakeup.clear()
        deadlines = [i.deadline for i in self._queue if i.deadline is not None]
        if not deadlines:  # the common case: no timer to arm
            await self._wakeup.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), max(0.0, min(deadlines).remaining()))

    async def _run_batch(self, batch: list[_Pending]) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        started = time.perf_counter_ns()
        for item in batch:
            self.stats.queue.add(started - item.enqueued_ns)
        try:
            results = await loop.run_in_executor(self._executor, self._execute, batch)
        except asyncio.CancelledError:  # the loop is going away: nobody must wait forever
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(Overloaded(f"model {self.name} is being unloaded"))
            raise
        except Exception as exc:  # the run failed for everyone in it
            results = [exc] * len(batch)
        finally:
            self._running -= 1
            self._running_requests -= len(batch)
            self._wakeup.set()  # a slot is free
        compute_ns = time.perf_counter_ns() - started
        self.stats.record_batch(sum(item.rows for item in batch), compute_ns)
        done = time.perf_counter_ns()
        for item, result in zip(batch, results, strict=True):
            self._settle(item, result, compute_ns, done)

    async def _wait_for_company(self) -> None:
        """Let the oldest request wait up to max_queue_delay for the company it can expect.

        The rows expected are the most requests seen outstanding at once since the last batch,
        less those already in a running batch (capped at max_batch_size): one sequential client
        never waits, eight concurrent ones run together as soon as all eight have arrived
        instead of waiting out the delay.
        """
        assert self._wakeup is not None
        delay_ns = self.settings.max_queue_delay_us * 1000
        company = self._peak - self._running_requests
        expected = min(self.settings.max_batch_size, max(1, company))
        self._peak = self._outstanding
        while True:
            head = self._queue[0]
            if self._queued_rows_like(head) >= expected:
                return
            remaining = (head.enqueued_ns + delay_ns - time.perf_counter_ns()) / 1e9
            deadlines = [i.deadline for i in self._queue if i.deadline is not None]
            if deadlines:  # wake in time to fail an expiring request promptly
                remaining = min(remaining, min(deadlines).remaining())
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return
            self._drop_finished()
            if not self._queue:
                return

    def _queued_rows_like(self, head: _Pending) -> int:
        return sum(item.rows for item in self._queue if item.key == head.key)

    def _drop_finished(self) -> None:
        """Drop cancelled requests and fail expired ones before they take a place in a run."""
        now = time.monotonic()
        if not any(
            item.future.done() or (item.deadline is not None and item.deadline.expired(now))
            for item in self._queue
        ):
            return
        kept: deque[_Pending] = deque()
        for item in self._queue:
            if item.future.done():
                continue
            if item.deadline is not None and item.deadline.expired(now):
                self.stats.fail.add(time.perf_counter_ns() - item.enqueued_ns)
                item.future.set_exception(
                    DeadlineExceeded(f"model {self.name}: the request's timeout passed in queue")
                )
                continue
            kept.append(item)
        self._queue = kept

    def _take_batch(self) -> list[_Pending]:
        if not self.batching:
            return [self._queue.popleft()]
        items = list(self._queue)
        chosen = select_batch(
            [i.key for i in items], [i.rows for i in items], self.settings.max_batch_size
        )
        taken = set(chosen)
        self._queue = deque(item for index, item in enumerate(items) if index not in taken)
        return [items[index] for index in chosen]

    def _execute(self, batch: list[_Pending]) -> list[Tensors | Exception]:
        """On the run thread: one run for the batch; if it fails, each request alone."""
        wanted = _union_outputs(batch)
        if len(batch) == 1:
            try:
                return [self._run(batch[0].inputs, wanted)]
            except Exception as exc:
                return [exc]
        try:
            merged = self._run(concat_rows([item.inputs for item in batch]), wanted)
            return list(split_rows(merged, [item.rows for item in batch]))
        except Exception:
            # One bad request (say, a token id out of range) must not fail its neighbours.
            log.info("model %s: batch of %d failed, retrying one by one", self.name, len(batch))
            results: list[Tensors | Exception] = []
            for item in batch:
                try:
                    results.append(self._run(item.inputs, wanted))
                except Exception as exc:
                    results.append(exc)
            return results

    def _settle(
        self, item: _Pending, result: Tensors | Exception, compute_ns: int, done_ns: int
    ) -> None:
        elapsed = done_ns - item.enqueued_ns
        if isinstance(result, Exception):
            self.stats.fail.add(elapsed)
            if not item.future.done():
                item.future.set_exception(_as_runtime_failure(result, self.name))
            return
        self.stats.success.add(elapsed)
        self.stats.record_latency(elapsed / 1e9)
        self.stats.compute_infer.add(compute_ns)
        if self._observe is not None:
            self._observe((elapsed - compute_ns) / 1e9, compute_ns / 1e9)
        if not item.future.done():
            if item.outputs is not None:
                result = {name: result[name] for name in item.outputs}
            item.future.set_result(result)


def _rows_of(inputs: Tensors) -> int:
    sizes = {a.shape[0] if a.ndim else 1 for a in inputs.values()}
    if len(sizes) != 1:
        raise InvalidRequest(
            f"inputs disagree on the batch size (dim 0): {sorted(sizes)}; every input of a "
            "batched model must carry the same number of rows"
        )
    return sizes.pop()


def _union_outputs(batch: list[_Pending]) -> list[str] | None:
    if any(item.outputs is None for item in batch):
        return None
    names: dict[str, None] = {}
    for item in batch:
        names.update(dict.fromkeys(item.outputs or []))
    return list(names)


def _as_runtime_failure(exc: Exception, model: str) -> Exception:
    if isinstance(exc, RuntimeFailure):
        return exc
    # onnxruntime's own errors are untyped; at this point the inputs already fit the signature,
    # so what remains is a value the graph rejects (e.g. an index out of range).
    return InvalidRequest(f"model {model} could not run on these inputs: {exc}")
