"""Continuous batching of one decoder span: the steps of its sequences, gathered into runs.

Every step call of a slot's sequences lands here. Decode steps (one new token each) waiting at
the same moment run as one ``DecoderSpan.step`` batch, their pasts left-padded to the longest
(the mask hides the padding); a sequence joins the next batch as soon as its step arrives and
leaves when it stops stepping: no batch waits for another to drain. A prompt (a step of several
tokens) runs in chunks of ``prefill_chunk_tokens``, each chunk as its own run between decode
batches, so a long prefill delays the others' decode by one chunk at a time, never by its whole
length (padding decode rows to a chunk's width would multiply their compute by the chunk size).
Between two decode batches one chunk of each waiting prompt runs, up to ``prefill_turn_tokens``
in all (at least one chunk): prompts that arrive together join the decode batch together instead
of one per decode run (measured on SmolLM2 through ``appliance serve``: 16 streams started
together ran a ramp of 16 decode runs of 1..15 rows before their first full batch, and as long
a ramp down at the end).

Before a decode batch runs, it waits a little for the rows that stepped in the last two runs
and have not come back yet (``_gather``): up to ``gather_s`` or a quarter of the last run,
whichever is longer. Without it a span's streams split into halves that alternate for good
(each half's next steps arrive while the other half runs): measured on SmolLM2 through
``appliance serve``, 16 streams ran as 137 runs of 8.2 rows on average for 64 tokens each. A row
late by a quarter of a run costs less waiting than a run of its own.

On a chain of spans the opposite is wanted: cohorts that follow one another, so that one span
computes a cohort while the next runs another. A span holding part of a model (``cohorts`` > 1)
splits its decode steps into ``cohorts`` batches when all of its open sequences wait at once
(the open sequences / ``cohorts`` rows each, rounded up), and then gathers only the rows that
ran with the ones waiting: each cohort stays whole. Fragments (more cohorts than ``cohorts``,
of at most half a cohort's rows) wait up to one run for other rows to join. One cohort of 4
streams on a chain of 3 spans keeps one span busy at a time; two cohorts of 2 keep two
(measured in docs/performance.md, generation under concurrency). A span holding the whole
model has no next span to overlap with: it runs one batch (``cohorts`` 1).

Runs happen one at a time on the slot's executor thread (onnxruntime releases the GIL); the
queues are touched only from the event loop. ``finish`` callbacks (sampling on the last span)
run on the executor too, so a batch's sampling never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.decoder import DecoderSpan, SequenceKV

Finish = Callable[[np.ndarray], Any]
GATHER_SHARE = 0.25  # a batch waits for its missing rows up to this share of the last run
KEEP_COHORT_RUNS = 8  # in cohorts, a row not seen for this many runs is waited for no more


@dataclass
class _Work:
    key: str
    kv: SequenceKV
    inputs: np.ndarray  # [1, T] ids or [1, T, H] hidden
    finish: Finish  # the span's output for this sequence -> the step's result
    future: asyncio.Future[Any]
    done: int = 0  # tokens of inputs already run (prefill chunks)
    start: int = 0  # kv.length before the step: restored if a run fails
    chunks: list[np.ndarray] = field(default_factory=list)  # hidden outputs so far

    @property
    def tokens(self) -> int:
        return int(self.inputs.shape[1])


@dataclass
class BatchStats:
    decode_batches: dict[int, int] = field(default_factory=dict)  # rows -> decode runs
    prefill_chunks: int = 0
    prefill_tokens: int = 0  # tokens run in steps of several tokens (prompts)
    decode_tokens: int = 0  # tokens run one per step (generated tokens fed back)
    alone_runs: int = 0  # runs (decode batches and prompt chunks) on the alone sessions


class StepBatcher:
    def __init__(
        self,
        span: DecoderSpan,
        executor: Executor,
        max_rows: int = 32,
        prefill_chunk_tokens: int = 64,
        gather_s: float = 0.0,
        prefill_turn_tokens: int = 256,
        cohorts: int = 1,
        active: Callable[[], int] = lambda: 0,
    ) -> None:
        self.span = span
        self.executor = executor
        self.max_rows = max(1, max_rows)
        self.prefill_chunk_tokens = prefill_chunk_tokens  # 0: a prompt runs whole
        self.gather_s = gather_s  # wait this long for rows of the last batch still missing
        self.prefill_turn_tokens = prefill_turn_tokens  # prompt tokens between decode batches
        self.cohorts = max(1, cohorts)  # decode batches the open sequences split into, at most
        self.active = active  # how many sequences are open on the span
        self.stats = BatchStats()
        self._decode: deque[_Work] = deque()
        self._prefill: deque[_Work] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._recent: dict[str, int] = {}  # key -> the decode run it was last in
        self._runs = 0  # decode runs so far
        self._last_run_s = 0.0  # how long the last decode run took
        self._last_was_decode = False

    @property
    def pending(self) -> int:
        return len(self._decode) + len(self._prefill)

    def submit(
        self, key: str, kv: SequenceKV, inputs: np.ndarray, finish: Finish
    ) -> asyncio.Future[Any]:
        """Queue ``inputs`` (one sequence's new tokens, batch dimension 1) on ``kv`` for the
        next batch; the future of ``finish`` applied to the span's output for this sequence
        (hidden [1, T, H], or logits [1, vocab] of its last token). Await it shielded: a
        cancelled caller leaves the work to complete (a KV never stops halfway in a step)."""
        loop = asyncio.get_running_loop()
        work = _Work(key, kv, inputs, finish, loop.create_future(), start=kv.length)
        (self._decode if work.tokens == 1 else self._prefill).append(work)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop())
        return work.future

    async def run(self, key: str, kv: SequenceKV, inputs: np.ndarray, finish: Finish) -> Any:
        return await asyncio.shield(self.submit(key, kv, inputs, finish))

    def forget(self, key: str) -> None:
        """The sequence was closed: its waiting steps are dropped, it is expected no more."""
        self._recent.pop(key, None)
        for queue in (self._decode, self._prefill):
            for work in [w for w in queue if w.key == key]:
                queue.remove(work)
                if not work.future.done():
                    work.future.cancel()

    def cancel(self) -> None:
        """The span is unloaded: nothing more runs (a run already on the thread completes)."""
        if self._task is not None:
            self._task.cancel()
        for work in (*self._decode, *self._prefill):
            if not work.future.done():
                work.future.cancel()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._decode or self._prefill:
            # a prefill chunk when the previous run was a decode batch (or nothing decodes)
            if self._prefill and (self._last_was_decode or not self._decode):
                # one chunk of each prompt waiting, up to the turn's budget (at least one)
                spent = 0
                for _ in range(len(self._prefill)):
                    if not self._prefill or (spent and spent >= self.prefill_turn_tokens):
                        break
                    spent += await self._run_chunk(loop, self._prefill.popleft())
                self._last_was_decode = False
            else:
                await self._gather()
                rows = min(self.cohort_rows(), len(self._decode))
                batch = [self._decode.popleft() for _ in range(rows)]
                await self._run_decode(loop, batch)
                self._last_was_decode = True
            # let the callers just answered submit their next steps before the next batch forms
            await asyncio.sleep(0)

    def cohort_rows(self) -> int:
        """The most rows the next decode batch takes. In cohorts, when every open sequence
        waits here (one cohort), they split into ``cohorts``; otherwise all that wait run:
        capping them at a cohort's rows cut chance cohorts of 9 and 7 into 8, 1 and 7, whose
        third run of 1 row cost a run of its own (16 streams on 3 spans, 0.65-0.90x tok/s)."""
        if self.cohorts <= 1:
            return self.max_rows
        if len(self._decode) >= self.active():
            return self._target()
        return self.max_rows

    def _merging(self) -> bool:
        """More cohorts than ``cohorts`` and the rows waiting at most half a cohort's: a
        fragment (a stream whose prompt finished apart, a row that came late) waits for
        another cohort to join. Cohorts near their size stay as chance made them: merging 3
        of 11 rows into 2 at 32 streams on 3 spans cost 0.78-1.03x tok/s."""
        many = len(set(self._recent.values())) > self.cohorts
        return many and len(self._decode) <= self._target() // 2

    def _target(self) -> int:
        """A cohort's rows: the open sequences / ``cohorts``, rounded up."""
        return min(self.max_rows, max(1, -(-self.active() // self.cohorts)))

    def _expected(self) -> tuple[set[str], int]:
        """The rows a decode batch waits for, and how many rows end the wait. A whole model:
        those of the last two runs (one batch of every stream). In cohorts: those that ran
        with the rows waiting (each cohort whole); and while there are more cohorts than
        ``cohorts`` (they form by chance as prompts finish), any recent row, until a cohort's
        rows wait: one cohort of 1 and one of 2 beside one of 1 ran 4 streams at 39 tok/s on 3
        spans, two of 2 at 51 (docs/performance.md)."""
        if self.cohorts <= 1:
            last_two = {key for key, run in self._recent.items() if run >= self._runs - 1}
            return last_two, self.max_rows
        if self._merging():
            return set(self._recent), self._target()
        runs = {self._recent.get(w.key) for w in self._decode}
        return {key for key, run in self._recent.items() if run in runs}, self.max_rows

    async def _gather(self) -> None:
        """Wait a little for the rows expected (``_expected``) that are still on their way,
        so that one late row does not split a batch, nor two halves alternate (whole model),
        nor a cohort split further (a chain's spans)."""
        if self.gather_s <= 0:
            return
        loop = asyncio.get_running_loop()
        expected, enough = self._expected()
        missing = expected - {w.key for w in self._decode}
        if not missing or len(self._decode) >= enough:
            return
        # rows of another cohort come a run later: a merge waits up to one run
        share = 1.0 if self.cohorts > 1 and self._merging() else GATHER_SHARE
        deadline = loop.time() + max(self.gather_s, share * self._last_run_s)
        while missing and (left := deadline - loop.time()) > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)
            missing = expected - {w.key for w in self._decode}
            if len(self._decode) >= enough:
                return

    async def _run_decode(self, loop: asyncio.AbstractEventLoop, batch: list[_Work]) -> None:
        self._runs += 1
        for work in batch:
            self._recent[work.key] = self._runs
        keep = 2 if self.cohorts <= 1 else KEEP_COHORT_RUNS
        for key in [k for k, run in self._recent.items() if run <= self._runs - keep]:
            del self._recent[key]  # not seen for that many runs: no longer waited for
        rows = len(batch)
        self.stats.decode_batches[rows] = self.stats.decode_batches.get(rows, 0) + 1
        self.stats.decode_tokens += rows
        alone = self._alone(rows, others_wait=bool(self._prefill))
        started = loop.time()
        try:
            results = await loop.run_in_executor(self.executor, self._decode_run, batch, alone)
        except BaseException as exc:
            for work in batch:
                _fail(work, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._last_run_s = loop.time() - started
        for work, result in zip(batch, results, strict=True):
            if not work.future.done():
                work.future.set_result(result)

    def _alone(self, rows: int, others_wait: bool) -> bool:
        """Whether a run of ``rows`` may take the span's alone sessions (more threads): it
        holds every open sequence, so no other span of this chain has work from this one
        meanwhile (the chain's spans run one cohort one after another). Decided on the loop,
        where the queues and the open count are current; counted in the stats."""
        alone = self.span.has_alone_sessions and not others_wait and rows >= self.active()
        self.stats.alone_runs += alone
        return alone

    def _decode_run(self, batch: list[_Work], alone: bool = False) -> list[Any]:
        inputs = np.concatenate([w.inputs for w in batch], axis=0)
        out = self.span.step([w.kv for w in batch], inputs, alone=alone)
        return [w.finish(out[row : row + 1]) for row, w in enumerate(batch)]

    async def _run_chunk(self, loop: asyncio.AbstractEventLoop, work: _Work) -> int:
        """Run the next chunk of ``work``'s prompt; the tokens it ran."""
        size = self.prefill_chunk_tokens or work.tokens
        end = min(work.tokens, work.done + size)
        tokens = end - work.done
        self.stats.prefill_chunks += 1
        self.stats.prefill_tokens += tokens
        alone = self._alone(1, others_wait=bool(self._decode or self._prefill))
        try:
            result = await loop.run_in_executor(self.executor, self._chunk_run, work, end, alone)
        except BaseException as exc:
            _fail(work, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return tokens
        if end < work.tokens:
            self._prefill.append(work)  # round robin between prompts being filled
        elif not work.future.done():
            work.future.set_result(result)
        return tokens

    def _chunk_run(self, work: _Work, end: int, alone: bool = False) -> Any:
        out = self.span.step([work.kv], work.inputs[:, work.done : end], alone=alone)
        work.done = end
        if end < work.tokens:
            if not self.span.is_last:
                work.chunks.append(out)
            return None
        if not self.span.is_last:
            out = np.concatenate([*work.chunks, out], axis=1) if work.chunks else out
        return work.finish(out)


def _fail(work: _Work, exc: BaseException) -> None:
    """A failed run: the KV goes back to where the step started (nothing half applied)."""
    truncate(work.kv, work.start)
    if not work.future.done():
        if isinstance(exc, asyncio.CancelledError):
            work.future.cancel()
        else:
            work.future.set_exception(exc)


def truncate(kv: SequenceKV, length: int) -> None:
    """Keep the first ``length`` tokens of a sequence's KV."""
    if length >= kv.length:
        return
    kv.replace([np.ascontiguousarray(k[:, :, :length]) for k in kv.keys],
               [np.ascontiguousarray(v[:, :, :length]) for v in kv.values], length)  # fmt: skip
