"""Admission: a key is worth storing once it was offered ``threshold`` times in a window.

A count-min sketch (``depth`` rows of ``width`` saturating 8-bit counters) estimates how often
each key was offered. Conservative update (only the smallest counters grow) keeps overestimates
low, and every ``window`` offers all counters are halved so that old popularity fades (TinyLFU's
reset). Errors only ever admit: a key seen once passes when all its counters are shared with
other keys, which is likely once a window holds more distinct keys than a row has counters.
Hence the default width is the power of two >= window (512 KB at 100,000 offers), where about
2 % of a window of all-distinct keys is admitted (measured); 4096 (16 KB) admitted 91 %.
"""

from __future__ import annotations

import numpy as np

from cache.errors import InvalidCacheSettings

_MAX = 255
_MASK64 = (1 << 64) - 1


class AdmissionSketch:
    """Counts offers per key and says whether a key has been offered often enough."""

    def __init__(
        self, threshold: int, window: int, width: int | None = None, depth: int = 4
    ) -> None:
        if threshold < 1 or threshold > _MAX:
            raise InvalidCacheSettings(f"admit_after {threshold} must be within 1..{_MAX}")
        if window < 1:
            raise InvalidCacheSettings(f"admission window {window} must be at least 1 offer")
        width = 1 << (window - 1).bit_length() if width is None else width
        if width < 1 or width & (width - 1) or depth < 1:
            raise InvalidCacheSettings(
                f"sketch width {width} must be a power of two and depth {depth} at least 1"
            )
        self.threshold = threshold
        self.window = window
        self._width = width
        self._depth = depth
        self._counts = bytearray(width * depth)
        self._offers = 0

    @property
    def nbytes(self) -> int:
        return len(self._counts)

    def offer(self, key: bytes) -> bool:
        """Count one offer of ``key``; True once its estimated count reaches the threshold."""
        if self.threshold == 1:
            return True
        counts = self._counts
        slots = self._slots(key)
        smallest = min(counts[i] for i in slots)
        if smallest < _MAX:
            for i in slots:
                if counts[i] == smallest:
                    counts[i] = smallest + 1
        self._offers += 1
        if self._offers >= self.window:
            self._halve()
        return smallest + 1 >= self.threshold

    def estimate(self, key: bytes) -> int:
        """How often ``key`` was offered (never less than the truth within the window)."""
        return min(self._counts[i] for i in self._slots(key))

    def _slots(self, key: bytes) -> list[int]:
        # double hashing over Python's (cached, per-process keyed) bytes hash: one hash per key
        h = hash(key) & _MASK64
        step = (h >> 32) | 1
        mask = self._width - 1
        return [row * self._width + ((h + row * step) & mask) for row in range(self._depth)]

    def _halve(self) -> None:
        self._offers = 0
        counters = np.frombuffer(self._counts, dtype=np.uint8)
        counters >>= 1
