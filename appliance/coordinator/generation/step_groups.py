"""The decode steps of sequences pinned to one chain, sent as one call per loop turn.

A node runs the decode steps of its sequences as one batch, and answers them together: their
coordinator tasks then wake in the same turn of the event loop and each asks its next step.
Sent one by one, every row of a batch costs a request on every hop: measured on SmolLM2
through ``appliance serve`` with 32 streams, the node's event loop and the coordinator's spent
a core between them on those requests, on a machine whose two cores onnxruntime wanted. Here
the one-token steps asked in one turn for the same chain (same nodes, spans, model and bytes)
leave as one ``STEPS`` call at the end of that turn; each caller still gets its own token or
its own error (``call_group``), so a failure, a replay or a timeout stays one sequence's. A
turn with a single step for a chain sends it as before (``STEP``), and prompts (several tokens)
always go alone: a row of a group waits for the slowest row, and a prompt's chunks are slow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from appliance.errors import SequenceLost, UpstreamError
from appliance.ring import protocol as rp
from appliance.ring.hop_transport import HopPost
from appliance.ring.sequences import STEP, SequenceRef, call_chain, call_group
from runtime.codec import encode_request
from runtime.deadline import Deadline

# rows per call: their ids travel in a header (33 bytes each), under aiohttp's 8 KiB a field
MAX_GROUP_ROWS = 64


@dataclass
class _Row:
    ref: SequenceRef
    deadline: Deadline
    position: int
    token: int
    future: asyncio.Future[dict[str, Any]]


@dataclass
class _Group:
    route: list[rp.RouteStep]
    rows: list[_Row] = field(default_factory=list)


class StepGroups:
    def __init__(self, post: HopPost, on_call: Callable[[str, int], None] | None = None) -> None:
        self.post = post
        self.on_call = on_call  # (model, rows) of each decode-step call, single ones included
        self.calls = 0  # STEPS calls sent
        self.rows = 0  # steps they carried
        self._open: dict[tuple[str, str, str], _Group] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def step(
        self, route: list[rp.RouteStep], ref: SequenceRef, deadline: Deadline, position: int,
        token: int,
    ) -> asyncio.Future[dict[str, Any]]:  # fmt: skip
        """Queue one sequence's one-token step on ``route``; its result (``{"token",
        "logprob"}``), or the error its own call would have raised."""
        loop = asyncio.get_running_loop()
        key = (ref.model, ref.digest, rp.encode_route(route))
        group = self._open.get(key)
        if group is not None and len(group.rows) >= MAX_GROUP_ROWS:
            self._send(key)  # full: it goes now, the next rows start another
            group = None
        if group is None:
            group = self._open[key] = _Group(route)
            loop.call_soon(self._send, key)  # after the callers woken in this turn
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        group.rows.append(_Row(ref, deadline, position, token, future))
        return future

    def _send(self, key: tuple[str, str, str]) -> None:
        group = self._open.pop(key, None)
        if group is None:  # sent already, when it filled up
            return
        rows = [r for r in group.rows if not r.future.done()]  # a cancelled caller's is gone
        if rows:
            task = asyncio.get_running_loop().create_task(self._call(group.route, rows))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, route: list[rp.RouteStep], rows: list[_Row]) -> None:
        ids = np.asarray([[r.token] for r in rows], dtype=np.int64)
        body, length = encode_request({"input_ids": ids})
        deadline = max((r.deadline for r in rows), key=lambda d: d.remaining())
        if self.on_call is not None:
            self.on_call(rows[0].ref.model, len(rows))
        try:
            if len(rows) == 1:
                row = rows[0]
                raw = await call_chain(self.post, STEP, route, row.ref, deadline, body,
                                       row.position, length)  # fmt: skip
                results: list[dict[str, Any]] = [orjson.loads(raw)]
            else:
                self.calls += 1
                self.rows += len(rows)
                results = await call_group(
                    self.post, route, rows[0].ref.model, rows[0].ref.digest,
                    [r.ref.sequence_id for r in rows], [r.position for r in rows], deadline,
                    body, length, rows[0].ref.request_id,
                )  # fmt: skip
        except asyncio.CancelledError:
            for row in rows:
                if not row.future.done():
                    row.future.cancel()
            raise
        except Exception as exc:  # the whole call failed: every row's own call would have
            for row in rows:
                if not row.future.done():
                    row.future.set_exception(_copy(exc, row.ref))
            return
        for row, result in zip(rows, results, strict=True):
            if row.future.done():
                continue
            if "token" in result:
                row.future.set_result(result)
            else:
                status = result.get("status")
                row.future.set_exception(UpstreamError(
                    status if isinstance(status, int) else 502, str(result.get("error"))
                ))  # fmt: skip

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _copy(exc: Exception, ref: SequenceRef) -> Exception:
    """A row's own exception (one instance raised in several tasks would share a traceback)."""
    if isinstance(exc, UpstreamError):
        return UpstreamError(exc.status, str(exc))
    if isinstance(exc, SequenceLost):
        return SequenceLost(f"{exc} (sequence {ref.sequence_id}, in a grouped step)")
    return exc
