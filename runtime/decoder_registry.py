"""The generation spans of one node (``DecoderSlot``s) and the one KV budget they share.

The budget's evictions (idle sequences, prefix-cache blocks) are dispatched to the slot that
owns them, and every free (a close, an expiry, an unload, a resize) lets each slot admit the
opens queued on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from runtime.decoder_admission import DecoderLimits
from runtime.decoder_load import load_decoder_span
from runtime.decoder_slots import DecoderSlot
from runtime.errors import ModelLoadError, ModelNotFound
from runtime.kv_budget import KvBudget, KvStats
from runtime.package import open_package
from runtime.session import SessionSettings

log = logging.getLogger(__name__)


class DecoderRegistry:
    """The generation spans of one node and its one KV budget (what its memory leaves)."""

    def __init__(
        self,
        repo: Path,
        settings: SessionSettings,
        kv_capacity: Callable[[list[DecoderSlot]], int],
        idle_ttl_s: float = 60.0,
        limits: DecoderLimits | None = None,
    ) -> None:
        self.repo = repo
        self.settings = settings
        self.kv_capacity = kv_capacity  # bytes of KV the node affords next to these spans
        self.budget = KvBudget(0, idle_ttl_s)
        self.limits = limits or DecoderLimits()
        self.limits.check()
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
        slot = self.attach(DecoderSlot(package, span, first, last, self.budget, self.limits))
        self.slots[slot_name] = slot
        if old is not None:
            self._drop(old)
        self._resize()
        self.generation += 1
        log.info("generation span %s ready (digest %s)", slot_name, package.digest)
        return slot

    def attach(self, slot: DecoderSlot) -> DecoderSlot:
        """Wire a slot to this registry: the budget's evictions and frees reach every slot."""
        slot.on_evicted = self._evicted
        slot.on_freed = self.pump
        return slot

    def _evicted(self, keys: list[str]) -> None:
        for key in keys:
            for slot in self.slots.values():
                if key.startswith(slot.key("")) and slot.forget(key):
                    log.info("evicted the idle KV of %s", key)

    def pump(self) -> None:
        now = time.monotonic()
        for slot in list(self.slots.values()):
            slot.pump(now)

    def unload(self, slot_name: str) -> None:
        slot = self.slots.pop(slot_name, None)
        if slot is None:
            raise ModelNotFound(f"this node holds no generation span {slot_name}")
        self._drop(slot)
        self._resize()
        self.generation += 1

    def _drop(self, slot: DecoderSlot) -> None:
        slot.on_freed = lambda: None
        for sequence_id in list(slot.sequences):
            slot.close(sequence_id)
        slot.shutdown()
        self.pump()

    def _resize(self) -> None:
        self.budget.capacity_bytes = max(0, self.kv_capacity(list(self.slots.values())))
        self.pump()

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for slot in self.slots.values():
            for sequence_id in slot.expire(now):
                log.info("freed the KV of sequence %s: no step for %.0fs", sequence_id,
                         self.budget.idle_ttl_s)  # fmt: skip
        self.pump()

    def stats(self) -> KvStats:
        return self.budget.stats()

    def close(self) -> None:
        for slot in list(self.slots.values()):
            self._drop(slot)
        self.slots.clear()
