"""The generation spans a node holds, and the sequences whose KV they keep.

A *slot* is one decoder span (``DecoderSpan``) with its sequences: each sequence is opened with
a KV reservation (prompt + max_tokens tokens, from the node's shared ``KvBudget``), stepped at
exactly the position its KV has reached, and closed when it finishes, is cancelled or fails.
A step for an unknown sequence or at another position is refused before anything runs, so a
step is never applied twice nor run on a replica without the KV. The span holding the LM head
samples the next token (``runtime.sampling``): logits never leave the node.

Admission: at most ``max_sequences`` per slot, within the budget; past either an open waits in
a bounded FIFO queue (``max_queued_sequences``, ``queue_timeout_s``) and is admitted when a
sequence closes or expires, else refused with SequenceQueueFull (503, retry later).

Steps of a slot's sequences are batched (``runtime.step_batcher``): decode steps waiting at
once run as one batch, prompts in chunks between them. An open may carry the prompt's ids: the
slot then starts the sequence from its longest cached prefix (``runtime.prefix_cache``) and
its first step may begin anywhere up to that; it stores the prompt's blocks once they are run.
The budget, the queue and the sequence table are touched only from the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.decode_ahead import Ahead, ahead_inputs, quiet
from runtime.decoder import DecoderSpan, SequenceKV
from runtime.decoder_admission import DecoderLimits, Waiter, wait_admitted
from runtime.errors import (
    InvalidRequest,
    KvBudgetExhausted,
    ModelNotFound,
    Overloaded,
    SequenceExists,
    SequenceQueueFull,
    UnexpectedPosition,
    UnknownSequence,
)
from runtime.kv_budget import KvBudget
from runtime.package import PackageRef
from runtime.prefix_cache import PrefixCache, block_hashes
from runtime.sampling import SamplingParams, sample
from runtime.step_batcher import StepBatcher, truncate

log = logging.getLogger(__name__)
PREFIX_KEY = "prefix:"


@dataclass
class Sequence:
    id: str
    kv: SequenceKV
    reserved_tokens: int
    sampling: SamplingParams | None  # the last span samples; the others carry none
    busy: bool = False  # a step of it is running
    fresh: bool = True  # no step yet: the first may start before kv.length (cached prefix)
    prefix_ids: list[int] | None = None  # the prompt's ids, to store its blocks once run
    prefix_names: list[str] = field(default_factory=list)
    stored_blocks: int = 0  # blocks of the prompt already cached (or found cached)
    ahead: Ahead | None = None  # its next step, run before it was asked (``decode_ahead``)


@dataclass(frozen=True)
class StepResult:
    hidden: np.ndarray | None  # the next span's input, or None from the last span
    token: int | None = None  # the last span's choice
    logprob: float | None = None
    logits: np.ndarray | None = None  # the last span's logits of that token (for tests)


class DecoderSlot:
    def __init__(self, package: PackageRef, span: DecoderSpan, first: int, last: int,
                 budget: KvBudget, limits: DecoderLimits | None = None) -> None:  # fmt: skip
        self.package, self.span, self.first, self.last = package, span, first, last
        self.budget = budget
        self.limits = limits or DecoderLimits()
        self.sequences: dict[str, Sequence] = {}
        self.tokens_computed = 0  # prompt and generated tokens run through this span
        self.prefill_tokens = 0  # tokens of prompts (a sequence's first step, or several)
        self.generated_tokens = 0  # tokens fed back one per step
        self.ahead_runs = 0  # steps run ahead (``decode_ahead``), used or not
        self.ahead_discarded = 0  # of those, undone or thrown away: compute spent for nothing
        self.prefix_hits = self.prefix_misses = self.cached_tokens_served = 0
        self.cache = PrefixCache(max(1, self.limits.prefix_block_tokens),
                                 self.limits.prefix_recent_blocks)  # fmt: skip
        self.waiting: deque[Waiter] = deque()
        self.on_evicted: Callable[[list[str]], None] = lambda keys: None
        self.on_freed: Callable[[], None] = lambda: None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="decoder")
        limits = self.limits
        # a span that holds part of the model splits its decode steps into cohorts that
        # follow one another along the chain, so that its spans compute at once; it gathers
        # only up to its cohort's rows (a gather up to every row kept one cohort: without it,
        # 3 spans, 32 streams: 1.29x tok/s; docs/performance.md)
        whole = span.is_first and span.is_last
        cohorts = 1 if whole else limits.decode_cohorts
        gather_s = limits.gather_s if whole or cohorts > 1 else 0.0
        self.batcher = StepBatcher(span, self._executor, limits.max_sequences,
                                   limits.prefill_chunk_tokens, gather_s,
                                   limits.prefill_turn_tokens, cohorts,
                                   lambda: len(self.sequences))  # fmt: skip

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def version(self) -> str:
        return str(self.package.version)

    @property
    def digest(self) -> str:
        return self.package.digest

    def key(self, sequence_id: str) -> str:
        return f"{self.name}#{self.first}-{self.last}/{sequence_id}"  # one budget per node

    async def open(self, sequence_id: str, reserve_tokens: int, sampling: SamplingParams | None,
                   now: float, prefix_ids: list[int] | None = None) -> int:  # fmt: skip
        """Admit a sequence with KV for ``reserve_tokens`` tokens, waiting in the queue if the
        span is full; the tokens of ``prefix_ids`` its KV starts with (0 without a cached
        prefix). A refusal leaves nothing behind."""
        if sequence_id in self.sequences or any(w.sequence_id == sequence_id for w in self.waiting):
            raise SequenceExists(f"sequence {sequence_id!r} is already open on this span")
        context = self.span.info.context_length
        if reserve_tokens > context:
            raise InvalidRequest(
                f"sequence {sequence_id!r} asks {reserve_tokens} tokens (prompt + max_tokens), "
                f"more than the model's context of {context}"
            )
        if prefix_ids is not None and len(prefix_ids) > reserve_tokens:
            raise InvalidRequest(
                f"sequence {sequence_id!r}: prefix_ids holds {len(prefix_ids)} ids, more than "
                f"the {reserve_tokens} tokens reserved (prompt + max_tokens)"
            )
        waiter = Waiter(sequence_id, reserve_tokens, sampling, prefix_ids)
        if not self.waiting:
            got = self._try_admit(waiter, now)
            if isinstance(got, int):
                return got
            if self.limits.max_queued_sequences == 0:
                raise got
        return await wait_admitted(self, waiter)

    def _try_admit(self, w: Waiter, now: float) -> int | Overloaded:
        """Admit now if a place and the KV are free: the cached tokens, or why not."""
        if len(self.sequences) >= self.limits.max_sequences:
            return SequenceQueueFull(
                f"segments {self.first}-{self.last} of {self.name} hold {len(self.sequences)} "
                f"sequences, max_sequences is {self.limits.max_sequences}"
            )
        kv, names, cached = self._cached_kv(w.prefix_ids)
        try:
            nbytes = w.reserve_tokens * self.span.kv_bytes_per_token
            evicted = self.budget.reserve(self.key(w.sequence_id), nbytes, now)
        except KvBudgetExhausted as exc:
            return exc
        self.on_evicted(evicted)
        if w.prefix_ids is not None:
            self.prefix_hits += cached > 0
            self.prefix_misses += cached == 0
            self.cached_tokens_served += cached
            for index, name in enumerate(names[: cached // self.cache.block_tokens]):
                self.budget.refresh(self.key(PREFIX_KEY + name), now - index * 1e-6)
        self.sequences[w.sequence_id] = Sequence(
            w.sequence_id, kv, w.reserve_tokens, w.sampling, prefix_ids=w.prefix_ids,
            prefix_names=names, stored_blocks=cached // self.cache.block_tokens,
        )  # fmt: skip
        return cached

    def _cached_kv(self, ids: list[int] | None) -> tuple[SequenceKV, list[str], int]:
        if ids is None or self.limits.prefix_block_tokens == 0:
            return self.span.empty_kv(), [], 0
        names = block_hashes(ids, self.cache.block_tokens)
        blocks = self.cache.matched(names)
        cached = min(blocks * self.cache.block_tokens, len(ids) - 1)  # one token is computed
        if cached <= 0:
            return self.span.empty_kv(), names, 0
        return self.cache.assemble(names[:blocks], cached), names, cached

    def pump(self, now: float) -> None:
        """Admit queued opens, oldest first, while they fit."""
        while self.waiting:
            waiter = self.waiting[0]
            if waiter.future is None or waiter.future.done():
                self.waiting.popleft()
                continue
            try:
                got = self._try_admit(waiter, now)
            except Exception as exc:  # e.g. can never fit any more: the waiter is told
                self.waiting.popleft()
                waiter.future.set_exception(exc)
                continue
            if not isinstance(got, int):
                return
            self.waiting.popleft()
            waiter.future.set_result(got)

    async def step(
        self, sequence_id: str, position: int, inputs: np.ndarray, now: float
    ) -> StepResult:
        """Run one step of a sequence: ``inputs`` are its new tokens' ids (first span) or
        hidden states, ``position`` where they start (= the tokens its KV holds)."""
        sequence = self._sequence(sequence_id)
        ahead = sequence.ahead
        if ahead is not None:
            if ahead.matches(position, inputs):
                try:
                    result: StepResult = await asyncio.shield(ahead.future)
                except Exception:
                    if sequence.ahead is ahead:  # failed (its KV cut back): not again
                        sequence.ahead = None
                    raise
                if sequence.ahead is ahead:
                    sequence.ahead = None
                return self._stepped(sequence, 1, False, result, now)
            await ahead.settle()  # not this step: undo it once it is over
            if sequence.ahead is ahead:
                sequence.ahead = None
                truncate(sequence.kv, ahead.position)
                self.ahead_discarded += 1
            sequence = self._sequence(sequence_id)  # it may have been closed meanwhile
        if sequence.fresh and not sequence.busy and 0 <= position < sequence.kv.length:
            truncate(sequence.kv, position)  # the chain's shortest cached prefix rules
        if sequence.busy or position != sequence.kv.length:
            raise UnexpectedPosition(
                f"sequence {sequence_id!r}: expected position {sequence.kv.length}, got "
                f"{position}{' (a step is running)' if sequence.busy else ''}"
            )
        tokens = int(inputs.shape[1]) if inputs.ndim >= 2 else 0
        if position + tokens > sequence.reserved_tokens:
            raise InvalidRequest(
                f"sequence {sequence_id!r}: {position + tokens} tokens exceed the "
                f"{sequence.reserved_tokens} it reserved (prompt + max_tokens)"
            )
        self._check_prefix(sequence, position, inputs)
        prefill = sequence.fresh or tokens > 1
        sequence.fresh = False
        future = self._submit(sequence, inputs)
        return self._stepped(sequence, tokens, prefill, await asyncio.shield(future), now)

    def _submit(self, sequence: Sequence, inputs: np.ndarray) -> asyncio.Future[StepResult]:
        """Queue one step of ``sequence`` for the next batch: busy until its run is over, even
        if its caller goes away meanwhile."""
        future = self.batcher.submit(sequence.id, sequence.kv, inputs,
                                     lambda out: self._finish(sequence, out))  # fmt: skip
        sequence.busy = True
        future.add_done_callback(lambda _: setattr(sequence, "busy", False))
        return future

    def _sequence(self, sequence_id: str) -> Sequence:
        sequence = self.sequences.get(sequence_id)
        if sequence is None:
            raise UnknownSequence(
                f"unknown sequence {sequence_id!r} on {self.name} segments "
                f"{self.first}-{self.last}: never opened here, or already released"
            )
        return sequence

    def _stepped(
        self, sequence: Sequence, tokens: int, prefill: bool, result: StepResult, now: float
    ) -> StepResult:
        self.tokens_computed += tokens
        if prefill:
            self.prefill_tokens += tokens
        else:
            self.generated_tokens += tokens
        if sequence.id in self.sequences:
            self.budget.touch(self.key(sequence.id), sequence.kv.nbytes(), now)
            self._store_prefix(sequence, now)
            self._run_ahead(sequence, result)
        return result

    def _run_ahead(self, sequence: Sequence, result: StepResult) -> None:
        """The next step of a sequence this span holds whole, fed the token just drawn."""
        if (
            not self.limits.decode_ahead
            or not (self.span.is_first and self.span.is_last)
            or result.token is None
            or sequence.busy
            or sequence.kv.length >= sequence.reserved_tokens
        ):
            return
        position = sequence.kv.length
        future = self._submit(sequence, ahead_inputs(result.token))
        future.add_done_callback(quiet)
        sequence.ahead = Ahead(position, result.token, future)
        self.ahead_runs += 1

    def _finish(self, sequence: Sequence, out: np.ndarray) -> StepResult:
        if not self.span.is_last:
            return StepResult(out)
        params = sequence.sampling or SamplingParams(temperature=0.0)
        # the draw depends on (seed, position of the token drawn) only: a replacement node
        # holding the same KV draws the same token
        token, logprob = sample(out[0], params, sequence.kv.length)
        return StepResult(None, token, logprob, out[0])

    def _check_prefix(self, sequence: Sequence, position: int, inputs: np.ndarray) -> None:
        """The first span sees the ids: a prompt that differs from its prefix_ids is not
        cached under their names."""
        ids = sequence.prefix_ids
        if ids is None or not self.span.is_first or position >= len(ids):
            return
        given = np.asarray(inputs[0, : len(ids) - position]).tolist()
        if given != ids[position : position + len(given)]:
            log.info("sequence %s: its input ids differ from its prefix_ids; not cached",
                     sequence.id)  # fmt: skip
            sequence.prefix_ids = None

    def _store_prefix(self, sequence: Sequence, now: float) -> None:
        """Cache the prompt's whole blocks its KV now holds (and that are not cached yet)."""
        if sequence.prefix_ids is None or self.limits.prefix_block_tokens == 0:
            return
        size = self.cache.block_tokens
        full = min(len(sequence.prefix_ids), sequence.kv.length) // size
        keys = [self.key(PREFIX_KEY + name) for name in sequence.prefix_names[:full]]
        for index in range(sequence.stored_blocks, full):
            name = sequence.prefix_names[index]
            # a prompt's later blocks count as a little older: evicted first, they leave its
            # head (what other prompts share) usable
            when = now - index * 1e-6
            if name in self.cache:
                self.budget.refresh(keys[index], when)
                continue
            if index and sequence.prefix_names[index - 1] not in self.cache:
                return  # a block is found only after all those before it
            block = self.cache.block_of(sequence.kv, index)
            try:  # never at the cost of this prompt's earlier blocks
                evicted = self.budget.keep(keys[index], block.nbytes(), when,
                                           frozenset(keys[:index]))  # fmt: skip
            except KvBudgetExhausted:
                return  # live sequences hold the rest: cache nothing more for now
            self.cache.put(name, block)
            self.on_evicted(evicted)
        sequence.stored_blocks = max(sequence.stored_blocks, full)

    def forget(self, key: str) -> bool:
        """The budget evicted ``key`` (a cache block or an abandoned sequence of this slot)."""
        rest = key[len(self.key("")) :]
        if rest.startswith(PREFIX_KEY):
            return self.cache.drop(rest[len(PREFIX_KEY) :])
        self.batcher.forget(rest)
        sequence = self.sequences.pop(rest, None)
        if sequence is not None:
            sequence.kv.release()
        return sequence is not None

    def close(self, sequence_id: str) -> bool:
        sequence = self.sequences.pop(sequence_id, None)
        self.budget.release(self.key(sequence_id))
        self.batcher.forget(sequence_id)  # a step ahead not started yet is dropped
        if sequence is not None:
            ahead = sequence.ahead
            if ahead is not None:
                self.ahead_discarded += 1  # it stopped: the step run ahead is not wanted
            if ahead is not None and not ahead.future.done():
                # the usual end of a sequence run ahead: its prompt's blocks are stored once
                # that run is over (stored now, they could be read as it replaces the KV)
                ahead.future.add_done_callback(lambda _: self._free(sequence))
            else:
                self._free(sequence, store=ahead is not None or not sequence.busy)
        self.on_freed()
        return sequence is not None

    def _free(self, sequence: Sequence, store: bool = True) -> None:
        if store:
            self._store_prefix(sequence, time.monotonic())  # in the room it held
        sequence.kv.release()  # a decode batch still listing it need not copy it out

    def expire(self, now: float) -> list[str]:
        """Sequences whose coordinator stopped stepping them for the budget's TTL: freed."""
        prefix = self.key("")
        gone = [key[len(prefix) :] for key in self.budget.expire(now) if key.startswith(prefix)]
        for sequence_id in gone:
            self.batcher.forget(sequence_id)
            if (sequence := self.sequences.pop(sequence_id, None)) is not None:
                sequence.kv.release()
        return gone

    def info(self) -> dict[str, Any]:
        """What metrics and heartbeats report of this span's batching and prefix cache."""
        return {
            "sequences_live": len(self.sequences),
            "sequences_queued": len(self.waiting),
            "prefill_tokens": self.prefill_tokens,
            "generated_tokens": self.generated_tokens,
            "ahead_runs": self.ahead_runs,
            "ahead_discarded": self.ahead_discarded,
            "decode_batches": dict(self.batcher.stats.decode_batches),
            "alone_runs": self.batcher.stats.alone_runs,
            "prefix_hits": self.prefix_hits,
            "prefix_misses": self.prefix_misses,
            "prefix_cached_tokens": self.cached_tokens_served,
            "prefix_block_tokens": self.cache.block_tokens,
            "prefix_blocks": self.cache.recent() if self.limits.prefix_block_tokens else [],
        }

    def shutdown(self) -> None:
        for waiter in self.waiting:
            if waiter.future is not None and not waiter.future.done():
                waiter.future.set_exception(ModelNotFound(f"{self.name} segments "
                                            f"{self.first}-{self.last} were unloaded"))  # fmt: skip
        self.waiting.clear()
        for name in self.cache.names():
            self.budget.release(self.key(PREFIX_KEY + name))
            self.cache.drop(name)
        self.batcher.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
