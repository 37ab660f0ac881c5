"""Coalescing concurrent requests into one hop (the coordinator's side of dynamic batching).

Profiling coordinator + node at concurrency 32 showed the coordinator spending most of its CPU
on per-request HTTP work (a client call per request, the node parsing each one), on the same
cores onnxruntime needs. Requests that arrive while the ring is busy are therefore sent
together: at most ``max_in_flight`` hops per model are outstanding; whatever queues up behind
them leaves as one hop (up to ``max_rows`` rows) as soon as one returns. A lone request never
waits (nothing is in flight), so latency at low load is unchanged; under load the node's batcher
receives batches that are already formed, and every span of the ring sees one hop per batch.

Requests batch together only when their inputs do (names, dtypes and non-batch dims, as in the
node's batcher). If a node refuses a batch as bad input (a 4xx: say one token id out of range),
each request is retried alone so one bad request cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from appliance.errors import UpstreamError
from runtime.batcher import BatchKey, Tensors, batch_key, concat_rows, select_batch, split_rows
from runtime.deadline import Deadline
from runtime.errors import DeadlineExceeded, Overloaded

log = logging.getLogger(__name__)

# (inputs, request id, deadline) -> outputs of every row
SendFn = Callable[[Tensors, str, Deadline], Awaitable[Tensors]]


@dataclass
class _Waiting:
    inputs: Tensors
    rows: int
    key: BatchKey
    request_id: str
    deadline: Deadline
    future: asyncio.Future[Tensors]
    on_sent: Callable[[float], None] | None = None
    queued_at: float = field(default_factory=time.perf_counter)


class HopBatcher:
    def __init__(
        self,
        send: SendFn,
        max_rows: int,
        max_in_flight: int,
        max_queued: int = 1024,
        name: str = "model",
    ) -> None:
        self._send = send
        self.max_rows = max_rows
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued  # beyond it: 503 + Retry-After, not an unbounded queue
        self.name = name
        self._queue: deque[_Waiting] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.hops = 0  # hops sent, for tests and the metrics of batch sizes
        self.rows_sent = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def infer(
        self,
        inputs: Tensors,
        request_id: str,
        deadline: Deadline,
        on_sent: Callable[[float], None] | None = None,
    ) -> Tensors:
        """Outputs for ``inputs``; ``deadline`` bounds the wait in queue too: a request still
        queued past it fails with DeadlineExceeded instead of leaving. ``on_sent`` is told the
        seconds it waited, when its hop leaves (the queue time of the statistics)."""
        if len(self._queue) >= self.max_queued:
            raise Overloaded(
                f"model {self.name}: {len(self._queue)} requests wait for the ring, the limit "
                f"is {self.max_queued}; retry later"
            )
        rows = next(iter(inputs.values())).shape[0] if inputs else 1
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        waiting = _Waiting(inputs, rows, batch_key(inputs), request_id, deadline, future, on_sent)
        self._queue.append(waiting)
        self._pump()
        return await future  # cancelled by its client: the batch still runs, its row is dropped

    def _pump(self) -> None:
        while self._queue and self._in_flight < self.max_in_flight:
            batch = self._take()
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Waiting]:
        now = time.monotonic()
        items = []
        for item in self._queue:
            if item.future.done():  # its client hung up
                continue
            if item.deadline.expired(now):
                item.future.set_exception(
                    DeadlineExceeded(
                        f"request {item.request_id} waited past its deadline for model "
                        f"{self.name}'s ring"
                    )
                )
                continue
            items.append(item)
        if not items:
            self._queue.clear()
            return []
        chosen = select_batch([i.key for i in items], [i.rows for i in items], self.max_rows)
        taken = set(chosen)
        self._queue = deque(item for index, item in enumerate(items) if index not in taken)
        return [items[index] for index in chosen]

    async def _run(self, batch: list[_Waiting]) -> None:
        try:
            results = await self._results(batch)
        finally:
            self._in_flight -= 1
            self._pump()
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    async def _results(self, batch: list[_Waiting]) -> list[Tensors | BaseException]:
        sent = time.perf_counter()
        for item in batch:
            if item.on_sent is not None:
                item.on_sent(sent - item.queued_at)
        self.hops += 1
        self.rows_sent += sum(item.rows for item in batch)
        if len(batch) == 1:
            try:
                item = batch[0]
                return [await self._send(item.inputs, item.request_id, item.deadline)]
            except Exception as exc:
                return [exc]
        request_id = f"{batch[0].request_id}+{len(batch) - 1}"
        deadline = min(item.deadline for item in batch)  # no member waits past its own
        try:
            merged = await self._send(
                concat_rows([item.inputs for item in batch]), request_id, deadline
            )
            return list(split_rows(merged, [item.rows for item in batch]))
        except UpstreamError as exc:
            if not 400 <= exc.status < 500:
                return [exc] * len(batch)
            log.info("batch %s refused (%s): each request alone", request_id, exc)
            alone = [self._send(i.inputs, i.request_id, i.deadline) for i in batch]
            return list(await asyncio.gather(*alone, return_exceptions=True))
        except Exception as exc:  # no replica, deadline: the same for every request in it
            return [exc] * len(batch)
