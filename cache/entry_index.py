"""The in-memory index of stored entries: their sizes, last access, and eviction by sampling.

Only the writer thread adds and removes; readers only ``touch`` (one dict store, no lock: a
touch racing a removal at worst leaves one stale access time behind, which sampling never sees
since it draws from the key list). Entries not read since the process started have access time
0, so they are evicted first.
"""

from __future__ import annotations

import random

NEVER = 0.0


class EntryIndex:
    """Keys with their value sizes and last access times; picks approximate-LRU victims."""

    def __init__(self, sample: int = 16, seed: int | None = None) -> None:
        self.sample = sample
        self.bytes_stored = 0
        self._keys: list[bytes] = []
        self._slot: dict[bytes, int] = {}
        self._size: dict[bytes, int] = {}
        self._atime: dict[bytes, float] = {}
        self._random = random.Random(seed)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._slot

    def add(self, key: bytes, size: int, atime: float = NEVER) -> None:
        """Record ``key`` with ``size`` value bytes (replacing its old size if present)."""
        old = self._size.get(key)
        if old is None:
            self._slot[key] = len(self._keys)
            self._keys.append(key)
        else:
            self.bytes_stored -= old
        self._size[key] = size
        self._atime[key] = atime
        self.bytes_stored += size

    def remove(self, key: bytes) -> int:
        """Forget ``key``; its value size, or 0 if it was not indexed."""
        slot = self._slot.pop(key, None)
        if slot is None:
            return 0
        last = self._keys.pop()
        if last != key:  # move the last key into the freed slot: O(1) removal
            self._keys[slot] = last
            self._slot[last] = slot
        self._atime.pop(key, None)
        size = self._size.pop(key)
        self.bytes_stored -= size
        return size

    def touch(self, key: bytes, now: float) -> None:
        """Mark ``key`` as read at ``now`` (ignored for keys not indexed)."""
        if key in self._slot:
            self._atime[key] = now

    def victim(self) -> bytes | None:
        """The least recently read of ``sample`` random keys (None when empty)."""
        if not self._keys:
            return None
        atime = self._atime
        picks = [self._keys[self._random.randrange(len(self._keys))] for _ in range(self.sample)]
        return min(picks, key=lambda k: atime.get(k, NEVER))
