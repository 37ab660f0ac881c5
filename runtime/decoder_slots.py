"""The generation spans a node holds, and the sequences whose KV they keep.

A *slot* is one decoder span (``DecoderSpan``) with its sequences: each sequence is opened with
a KV reservation (prompt + max_tokens tokens, from the node's shared ``KvBudget``), stepped at
exactly the position its KV has reached, and closed when it finishes, is cancelled or fails.
A step for an unknown sequence or at another position is refused before anything runs, so a
step is never applied twice nor run on a replica without the KV. The span holding the LM head
samples the next token (``runtime.sampling``): logits never leave the node.

Steps of one slot run one at a time on its own thread (onnxruntime releases the GIL, so the
event loop keeps serving meanwhile); the budget and the sequence table are touched only from
the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.decoder import DecoderSpan, SequenceKV, load_decoder_span
from runtime.errors import (
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    SequenceExists,
    UnexpectedPosition,
    UnknownSequence,
)
from runtime.kv_budget import KvBudget, KvStats
from runtime.package import PackageRef, open_package
from runtime.sampling import SamplingParams, sample
from runtime.session import SessionSettings

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    id: str
    kv: SequenceKV
    reserved_tokens: int
    sampling: SamplingParams | None  # the last span samples; the others carry none
    busy: bool = False  # a step of it is running


@dataclass(frozen=True)
class StepResult:
    hidden: np.ndarray | None  # the next span's input, or None from the last span
    token: int | None = None  # the last span's choice
    logprob: float | None = None


@dataclass
class DecoderSlot:
    package: PackageRef
    span: DecoderSpan
    first: int
    last: int
    budget: KvBudget
    sequences: dict[str, Sequence] = field(default_factory=dict)
    tokens_computed: int = 0  # prompt and generated tokens run through this span
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="decoder")
    )

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def version(self) -> str:
        return str(self.package.version)

    @property
    def digest(self) -> str:
        return self.package.digest

    def _key(self, sequence_id: str) -> str:
        return f"{self.name}#{self.first}-{self.last}/{sequence_id}"  # one budget per node

    def open(
        self, sequence_id: str, reserve_tokens: int, sampling: SamplingParams | None, now: float
    ) -> None:
        """Admit a sequence with KV for ``reserve_tokens`` tokens; the budget's errors (503
        to retry later, or "can never fit") leave nothing behind."""
        if sequence_id in self.sequences:
            raise SequenceExists(f"sequence {sequence_id!r} is already open on this span")
        context = self.span.info.context_length
        if reserve_tokens > context:
            raise InvalidRequest(
                f"sequence {sequence_id!r} asks {reserve_tokens} tokens (prompt + max_tokens), "
                f"more than the model's context of {context}"
            )
        nbytes = reserve_tokens * self.span.kv_bytes_per_token
        for evicted in self.budget.reserve(self._key(sequence_id), nbytes, now):
            log.info("evicted the idle KV of %s", evicted)
        self.sequences[sequence_id] = Sequence(
            sequence_id, self.span.empty_kv(), reserve_tokens, sampling
        )

    async def step(
        self, sequence_id: str, position: int, inputs: np.ndarray, now: float
    ) -> StepResult:
        """Run one step of a sequence: ``inputs`` are its new tokens' ids (first span) or
        hidden states, ``position`` where they start (= the tokens its KV holds)."""
        sequence = self.sequences.get(sequence_id)
        if sequence is None:
            raise UnknownSequence(
                f"unknown sequence {sequence_id!r} on {self.name} segments "
                f"{self.first}-{self.last}: never opened here, or already released"
            )
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
        sequence.busy = True
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, self._run, sequence, inputs)
        finally:
            sequence.busy = False
        self.tokens_computed += tokens
        self.budget.touch(self._key(sequence_id), sequence.kv.nbytes(), now)
        return result

    def _run(self, sequence: Sequence, inputs: np.ndarray) -> StepResult:
        out = self.span.step([sequence.kv], inputs)
        if not self.span.is_last:
            return StepResult(out)
        params = sequence.sampling or SamplingParams(temperature=0.0)
        # the draw depends on (seed, position of the token drawn) only: a replacement node
        # holding the same KV draws the same token
        token, logprob = sample(out[0], params, sequence.kv.length)
        return StepResult(None, token, logprob)

    def close(self, sequence_id: str) -> bool:
        self.budget.release(self._key(sequence_id))
        return self.sequences.pop(sequence_id, None) is not None

    def expire(self, now: float) -> list[str]:
        """Sequences whose coordinator stopped stepping them for the budget's TTL: freed."""
        prefix = self._key("")
        gone = [key[len(prefix) :] for key in self.budget.expire(now) if key.startswith(prefix)]
        for sequence_id in gone:
            self.sequences.pop(sequence_id, None)
        return gone

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class DecoderRegistry:
    """The generation spans of one node and its one KV budget (what its memory leaves)."""

    def __init__(
        self,
        repo: Path,
        settings: SessionSettings,
        kv_capacity: Callable[[list[DecoderSlot]], int],
        idle_ttl_s: float = 60.0,
    ) -> None:
        self.repo = repo
        self.settings = settings
        self.kv_capacity = kv_capacity  # bytes of KV the node affords next to these spans
        self.budget = KvBudget(0, idle_ttl_s)
        self.slots: dict[str, DecoderSlot] = {}
        self.generation = 0

    def get(self, slot_name: str) -> DecoderSlot:
        slot = self.slots.get(slot_name)
        if slot is None:
            raise ModelNotFound(f"this node holds no generation span {slot_name}")
        return slot

    async def load(
        self, name: str, version: int, first: int, last: int, slot_name: str
    ) -> DecoderSlot:
        package = open_package(self.repo, name, version)
        try:
            span = await asyncio.to_thread(load_decoder_span, package, self.settings, first, last)
        except ModelLoadError:
            raise
        except Exception as exc:  # onnxruntime's errors are untyped
            raise ModelLoadError(f"loading {name} segments {first}-{last} failed: {exc}") from exc
        old = self.slots.get(slot_name)
        slot = DecoderSlot(package, span, first, last, self.budget)
        self.slots[slot_name] = slot
        if old is not None:
            self._drop(old)
        self._resize()
        self.generation += 1
        log.info("generation span %s ready (digest %s)", slot_name, package.digest)
        return slot

    def unload(self, slot_name: str) -> None:
        slot = self.slots.pop(slot_name, None)
        if slot is None:
            raise ModelNotFound(f"this node holds no generation span {slot_name}")
        self._drop(slot)
        self._resize()
        self.generation += 1

    def _drop(self, slot: DecoderSlot) -> None:
        for sequence_id in list(slot.sequences):
            slot.close(sequence_id)
        slot.shutdown()

    def _resize(self) -> None:
        self.budget.capacity_bytes = max(0, self.kv_capacity(list(self.slots.values())))

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for slot in self.slots.values():
            for sequence_id in slot.expire(now):
                log.info("freed the KV of sequence %s: no step for %.0fs", sequence_id,
                         self.budget.idle_ttl_s)  # fmt: skip

    def stats(self) -> KvStats:
        return self.budget.stats()

    def close(self) -> None:
        for slot in self.slots.values():
            self._drop(slot)
        self.slots.clear()
