"""A node's accounting of the KV-cache memory of its span, per sequence (bookkeeping only).

A sequence reserves its worst case (prompt + max_tokens worth of KV, computed by the caller)
before its first step, so a step can never run out of memory halfway through a generation.
A sequence is *live* while it steps; *idle* once finished with its KV kept for reuse (its
reservation shrinks to the bytes it used), and a live one becomes idle when no step came for
``idle_ttl_s`` (its client went away). Idle sequences are evicted least recently used first
to admit a new one; live ones never are. Time is passed in (monotonic seconds), so every
decision is a pure function of the calls made; not thread-safe (one event loop owns it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

from runtime.errors import (
    KvBudgetExhausted,
    KvReservationExceeded,
    KvReservationTooLarge,
    UnknownSequence,
)


@dataclass(frozen=True)
class SequenceUsage:
    reserved_bytes: int
    used_bytes: int  # the KV bytes its last step reported
    live: bool  # False: finished (mark_idle); a live one past the TTL counts as idle too
    last_active: float  # the time of its last reserve, touch or mark_idle
    cached: bool = False  # a prefix-cache block (keep): evictable, never expired, not a sequence


class KvStats(NamedTuple):
    reserved_bytes: int
    used_bytes: int
    live_sequences: int
    idle_sequences: int  # finished ones only; live ones past the TTL are still counted live
    cached_bytes: int = 0  # prefix-cache blocks (not in reserved_bytes; evicted LRU for room)
    cached_blocks: int = 0


class KvBudget:
    def __init__(self, capacity_bytes: int, idle_ttl_s: float, retry_after_s: float = 1.0) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"capacity_bytes: must be an integer >= 0, got {capacity_bytes!r}")
        if not (math.isfinite(idle_ttl_s) and idle_ttl_s > 0):
            raise ValueError(f"idle_ttl_s: must be a finite number > 0, got {idle_ttl_s!r}")
        self.capacity_bytes = capacity_bytes
        self.idle_ttl_s = float(idle_ttl_s)
        self.retry_after_s = retry_after_s
        self._sequences: dict[str, SequenceUsage] = {}
        self._reserved = 0  # running sums, so stats() and free_bytes() are O(1)
        self._used = 0
        self._cached = 0  # the part of _reserved (and _used) held by cache blocks
        self._cached_count = 0

    def __contains__(self, sequence_id: object) -> bool:
        return sequence_id in self._sequences

    def __len__(self) -> int:
        return len(self._sequences)

    def usage(self, sequence_id: str) -> SequenceUsage | None:
        return self._sequences.get(sequence_id)

    def free_bytes(self) -> int:
        return self.capacity_bytes - self._reserved

    def stats(self) -> KvStats:
        live = sum(1 for s in self._sequences.values() if s.live)
        idle = len(self._sequences) - live - self._cached_count
        return KvStats(self._reserved - self._cached, self._used - self._cached, live, idle,
                       self._cached, self._cached_count)  # fmt: skip

    def evictable(self, sequence_id: str, now: float) -> bool:
        """Idle, or live with no activity for the TTL (abandoned): its KV may be dropped."""
        usage = self._sequences.get(sequence_id)
        return usage is not None and (not usage.live or now - usage.last_active >= self.idle_ttl_s)

    def reserve(self, sequence_id: str, nbytes: int, now: float) -> list[str]:
        """Admit ``sequence_id`` with ``nbytes`` reserved, marked live; the ids evicted for it.

        The caller must drop the KV of every id returned. A sequence already held (a new turn
        reusing its kept KV) has its reservation replaced, its own bytes counting as free.
        Idle sequences are evicted LRU only when that makes room; otherwise nothing changes and
        KvBudgetExhausted (an Overloaded: retry later) is raised. Above the whole capacity it
        raises KvReservationTooLarge: such a sequence can never fit on this node.
        """
        if not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes: must be an integer >= 0, got {nbytes!r}")
        if nbytes > self.capacity_bytes:
            raise KvReservationTooLarge(
                f"sequence {sequence_id!r} asks {nbytes} bytes of KV cache, more than this "
                f"node's whole capacity of {self.capacity_bytes} bytes: it can never fit; "
                "ask fewer prompt + max_tokens tokens"
            )
        current = self._sequences.get(sequence_id)
        free = self.free_bytes() + (current.reserved_bytes if current else 0)
        evicted = self._make_room(sequence_id, nbytes, free, now)
        used = current.used_bytes if current else 0
        self._put(sequence_id, SequenceUsage(nbytes, min(used, nbytes), True, now))
        return evicted

    def keep(
        self, block_id: str, nbytes: int, now: float, protect: frozenset[str] = frozenset()
    ) -> list[str]:
        """Hold a prefix-cache block of ``nbytes`` (idle from the start: evicted LRU for any
        reservation, never by expire); the ids evicted for it, never one of ``protect`` (the
        blocks before it in its prompt). No room (live sequences hold the rest):
        KvBudgetExhausted, nothing changes."""
        if nbytes > self.capacity_bytes:
            raise self._exhausted(block_id, nbytes, self.free_bytes(), 0)
        evicted = self._make_room(block_id, nbytes, self.free_bytes(), now, protect)
        self._put(block_id, SequenceUsage(nbytes, nbytes, False, now, cached=True))
        return evicted

    def refresh(self, block_id: str, now: float) -> None:
        """A cache block was used: most recently used now (LRU order)."""
        usage = self._sequences.get(block_id)
        if usage is not None:
            self._sequences[block_id] = replace(usage, last_active=now)

    def _make_room(
        self,
        sequence_id: str,
        nbytes: int,
        free: int,
        now: float,
        protect: frozenset[str] = frozenset(),
    ) -> list[str]:
        evicted: list[str] = []
        if nbytes > free:
            victims = sorted(
                (u.last_active, sid)
                for sid, u in self._sequences.items()
                if sid != sequence_id and sid not in protect and self.evictable(sid, now)
            )
            reclaimable = sum(self._sequences[sid].reserved_bytes for _, sid in victims)
            if nbytes > free + reclaimable:
                raise self._exhausted(sequence_id, nbytes, free, reclaimable)
            for _, sid in victims:
                if nbytes <= free:
                    break
                free += self.release(sid)
                evicted.append(sid)
        return evicted

    def touch(self, sequence_id: str, used_bytes: int, now: float) -> None:
        """A step ran: the sequence is live and holds ``used_bytes`` of KV (<= its reservation)."""
        usage = self._held(sequence_id)
        if not isinstance(used_bytes, int) or used_bytes < 0:
            raise ValueError(f"used_bytes: must be an integer >= 0, got {used_bytes!r}")
        if used_bytes > usage.reserved_bytes:
            raise KvReservationExceeded(
                f"sequence {sequence_id!r} holds {used_bytes} bytes of KV cache, above its "
                f"reservation of {usage.reserved_bytes} bytes (prompt + max_tokens); reserve "
                "again before growing past it"
            )
        self._put(sequence_id, replace(usage, used_bytes=used_bytes, live=True, last_active=now))

    def mark_idle(self, sequence_id: str, now: float) -> None:
        """Finished, KV kept for reuse: the reservation shrinks to the bytes actually used."""
        usage = self._held(sequence_id)
        kept = SequenceUsage(usage.used_bytes, usage.used_bytes, False, now)
        self._put(sequence_id, kept)

    def release(self, sequence_id: str) -> int:
        """Forget the sequence (finish, cancel, failure); the bytes it had reserved.

        Idempotent: an unknown id frees 0, so every error path may call it.
        """
        usage = self._sequences.pop(sequence_id, None)
        if usage is None:
            return 0
        self._reserved -= usage.reserved_bytes
        self._used -= usage.used_bytes
        if usage.cached:
            self._cached -= usage.reserved_bytes
            self._cached_count -= 1
        return usage.reserved_bytes

    def expire(self, now: float) -> list[str]:
        """Free every sequence with no activity for ``idle_ttl_s``; the caller drops their KV."""
        stale = [
            sid
            for sid, u in self._sequences.items()
            if not u.cached and now - u.last_active >= self.idle_ttl_s
        ]
        for sid in stale:
            self.release(sid)
        return stale

    def _held(self, sequence_id: str) -> SequenceUsage:
        usage = self._sequences.get(sequence_id)
        if usage is None:
            raise UnknownSequence(
                f"sequence {sequence_id!r} holds no KV reservation on this node (never reserved, "
                "released, or expired after no step for the idle TTL); start it again"
            )
        return usage

    def _put(self, sequence_id: str, usage: SequenceUsage) -> None:
        self.release(sequence_id)
        self._sequences[sequence_id] = usage
        self._reserved += usage.reserved_bytes
        self._used += usage.used_bytes
        if usage.cached:
            self._cached += usage.reserved_bytes
            self._cached_count += 1

    def _exhausted(
        self, sequence_id: str, nbytes: int, free: int, reclaimable: int
    ) -> KvBudgetExhausted:
        live = self.stats().live_sequences
        return KvBudgetExhausted(
            f"KV cache full: sequence {sequence_id!r} asks {nbytes} bytes, {free} are free "
            f"(+{reclaimable} held by idle sequences) of a capacity of {self.capacity_bytes} "
            f"bytes, the rest reserved by {live} live sequences; retry after "
            f"{self.retry_after_s:g}s",
            retry_after_s=self.retry_after_s,
        )
