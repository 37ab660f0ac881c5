"""Admission of new sequences to a decoder span: its limits, and the bounded queue of opens
that wait for a place (``max_sequences``) or for KV (the node's budget) to come free."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runtime.errors import SequenceQueueFull
from runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from runtime.decoder_slots import DecoderSlot


@dataclass(frozen=True)
class DecoderLimits:
    max_sequences: int = 32  # open sequences per span (and the most rows of a decode batch)
    max_queued_sequences: int = 64  # opens waiting per span; more: 503 at once
    queue_timeout_s: float = 30.0  # the longest an open waits before its 503
    prefill_chunk_tokens: int = 64  # a prompt runs in chunks of this many tokens (0: whole)
    gather_s: float = 0.0  # a decode batch's wait for rows of the last runs (step_batcher)
    prefill_turn_tokens: int = 256  # prompt tokens run between two decode batches (step_batcher)
    prefix_block_tokens: int = 32  # tokens per prefix-cache block (0: no prefix cache)
    prefix_recent_blocks: int = 256  # block names a heartbeat reports per span
    decode_ahead: bool = True  # a span holding the whole model runs the next step unasked
    decode_cohorts: int = 2  # a span holding part of a model: decode batches per step, at most

    def check(self) -> None:
        if self.max_sequences < 1:
            raise ValueError(f"max_sequences must be at least 1, got {self.max_sequences}")
        if self.decode_cohorts < 1:
            raise ValueError(f"decode_cohorts must be at least 1, got {self.decode_cohorts}")
        for name in ("max_queued_sequences", "prefill_chunk_tokens", "prefill_turn_tokens",
                     "prefix_block_tokens", "prefix_recent_blocks"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not (math.isfinite(self.queue_timeout_s) and self.queue_timeout_s > 0):
            raise ValueError(f"queue_timeout_s must be above 0, got {self.queue_timeout_s}")
        if not (math.isfinite(self.gather_s) and self.gather_s >= 0):
            raise ValueError(f"gather_s must be 0 or more, got {self.gather_s}")


@dataclass(eq=False)
class Waiter:
    """An open not admitted yet; its future gets the cached tokens once it is."""

    sequence_id: str
    reserve_tokens: int
    sampling: SamplingParams | None
    prefix_ids: list[int] | None
    future: asyncio.Future[int] | None = None


async def wait_admitted(slot: DecoderSlot, waiter: Waiter) -> int:
    """Queue ``waiter`` on ``slot`` (FIFO) until ``slot.pump`` admits it; SequenceQueueFull
    when the queue is full or the wait passes ``queue_timeout_s``."""
    limits = slot.limits
    if len(slot.waiting) >= limits.max_queued_sequences:
        raise SequenceQueueFull(
            f"segments {slot.first}-{slot.last} of {slot.name} are full ({len(slot.sequences)} "
            f"sequences, max_sequences {limits.max_sequences}, or the KV budget) and "
            f"{len(slot.waiting)} opens already wait (max_queued_sequences "
            f"{limits.max_queued_sequences}); retry later",
            retry_after_s=1.0,
        )
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiter.future = future
    slot.waiting.append(waiter)
    try:
        return await asyncio.wait_for(asyncio.shield(future), limits.queue_timeout_s)
    except BaseException as exc:
        if waiter in slot.waiting:
            slot.waiting.remove(waiter)
        if future.done() and not future.cancelled() and future.exception() is None:
            slot.close(waiter.sequence_id)  # admitted just as its caller gave up
        elif not future.done():
            future.cancel()
        if isinstance(exc, TimeoutError):
            raise SequenceQueueFull(
                f"sequence {waiter.sequence_id!r} waited {limits.queue_timeout_s:g}s for a "
                f"place on segments {slot.first}-{slot.last} of {slot.name} "
                "(queue_timeout_s); retry later",
                retry_after_s=1.0,
            ) from None
        raise
