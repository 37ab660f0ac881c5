"""The admission sketch: counts offers, forgets with time, and rarely admits one-hit wonders."""

from __future__ import annotations

import hashlib

import pytest

from cache.admission import AdmissionSketch
from cache.errors import InvalidCacheSettings


def key(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()


def test_admits_on_the_kth_offer() -> None:
    sketch = AdmissionSketch(threshold=3, window=1000)
    assert [sketch.offer(key(1)) for _ in range(4)] == [False, False, True, True]
    assert sketch.estimate(key(1)) == 4
    assert sketch.estimate(key(2)) == 0
    assert AdmissionSketch(threshold=1, window=1000).offer(key(1))


def test_halving_every_window_forgets_old_offers() -> None:
    # wide rows: the slots hash with Python's per-process seed, and at the default width (16)
    # key(0) shared all four counters with the nine other keys in about 4 % of runs
    sketch = AdmissionSketch(threshold=2, window=10, width=4096)
    assert not sketch.offer(key(0))
    for i in range(1, 10):  # the 10th offer halves every counter: key(0) goes back to 0
        sketch.offer(key(i))
    assert sketch.estimate(key(0)) == 0
    assert not sketch.offer(key(0))


def test_one_hit_wonders_are_rarely_admitted_at_default_size() -> None:
    sketch = AdmissionSketch(threshold=2, window=100_000)
    admitted = sum(sketch.offer(key(i)) for i in range(50_000))
    assert sketch.nbytes == 4 * 131_072
    assert admitted / 50_000 < 0.02


def test_bad_settings_say_what_is_accepted() -> None:
    with pytest.raises(InvalidCacheSettings, match="within 1..255"):
        AdmissionSketch(threshold=0, window=10)
    with pytest.raises(InvalidCacheSettings, match="power of two"):
        AdmissionSketch(threshold=2, window=10, width=1000)
