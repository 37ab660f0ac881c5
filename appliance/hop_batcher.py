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
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from appliance.errors import UpstreamError
from runtime.batcher import BatchKey, Tensors, batch_key, concat_rows, select_batch, split_rows

log = logging.getLogger(__name__)

# (inputs, request id) -> outputs of every row
SendFn = Callable[[Tensors, str], Awaitable[Tensors]]


@dataclass
class _Waiting:
    inputs: Tensors
    rows: int
    key: BatchKey
    request_id: str
    future: asyncio.Future[Tensors]


class HopBatcher:
    def __init__(self, send: SendFn, max_rows: int, max_in_flight: int) -> None:
        self._send = send
        self.max_rows = max_rows
        self.max_in_flight = max_in_flight
        self._queue: deque[_Waiting] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.hops = 0  # hops sent, for tests and the metrics of batch sizes
        self.rows_sent = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def infer(self, inputs: Tensors, request_id: str) -> Tensors:
        rows = next(iter(inputs.values())).shape[0] if inputs else 1
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(inputs, rows, batch_key(inputs), request_id, future))
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
        items = [item for item in self._queue if not item.future.done()]  # drop the cancelled
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
        self.hops += 1
        self.rows_sent += sum(item.rows for item in batch)
        if len(batch) == 1:
            try:
                return [await self._send(batch[0].inputs, batch[0].request_id)]
            except Exception as exc:
                return [exc]
        request_id = f"{batch[0].request_id}+{len(batch) - 1}"
        try:
            merged = await self._send(concat_rows([item.inputs for item in batch]), request_id)
            return list(split_rows(merged, [item.rows for item in batch]))
        except UpstreamError as exc:
            if not 400 <= exc.status < 500:
                return [exc] * len(batch)
            log.info("batch %s refused (%s): each request alone", request_id, exc)
            alone = [self._send(item.inputs, item.request_id) for item in batch]
            return list(await asyncio.gather(*alone, return_exceptions=True))
        except Exception as exc:  # no replica, deadline: the same for every request in it
            return [exc] * len(batch)
