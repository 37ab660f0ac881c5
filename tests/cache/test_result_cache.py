"""The LMDB result cache: round trips, admission, eviction, restart, and degrading safely."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest

from cache.errors import InvalidCacheSettings
from cache.keys import PREFIX_BYTES, cache_key, digest_prefix
from cache.open_marker import MARKER, boot_id
from cache.result_cache import CacheSettings, ResultCache

DIGEST = "sha256:" + hashlib.sha256(b"model").hexdigest()
OTHER = "sha256:" + hashlib.sha256(b"other").hexdigest()

MakeCache = Callable[..., ResultCache]


@pytest.fixture
def make_cache(tmp_path: Path) -> Iterator[MakeCache]:
    """Started caches under tmp_path/cache (or ``path``); all closed at the end of the test."""
    made: list[ResultCache] = []

    def make(path: Path | None = None, start: bool = True, **settings: Any) -> ResultCache:
        cache = ResultCache(CacheSettings(path=path or tmp_path / "cache", **settings))
        if start:
            cache.start()
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


def key_of(i: int, digest: str = DIGEST) -> bytes:
    return cache_key(digest, {"x": np.array([i], dtype=np.int64)}, None)


def outputs_of(i: int, floats: int = 4) -> dict[str, np.ndarray]:
    return {"y": np.full(floats, i, dtype=np.float32)}


def every_dtype() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    outputs = {
        dtype: (rng.random((2, 3)) * 100).astype(dtype)
        for dtype in ["u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"]
    }
    outputs["bool"] = rng.random((3, 1)) > 0.5
    text = np.empty((2, 2), dtype=object)
    text[:] = [[b"", b"a"], ["\u00e9t\u00e9", b"\x00\xff" * 300]]
    outputs["bytes"] = text
    outputs["scalar"] = np.array(7.5, dtype=np.float64)
    outputs["empty"] = np.zeros((0, 4), dtype=np.int32)
    outputs["strided"] = np.arange(20, dtype=np.int16).reshape(4, 5)[:, ::2]
    return outputs


def assert_same(got: dict[str, np.ndarray] | None, want: dict[str, np.ndarray]) -> None:
    assert got is not None
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        if array.dtype == object:
            expected = [item.encode() if isinstance(item, str) else item for item in array.flat]
            assert got[name].dtype == object
            assert got[name].shape == array.shape
            assert list(got[name].flat) == expected
        else:
            assert got[name].dtype == array.dtype, name
            assert got[name].shape == array.shape, name
            np.testing.assert_array_equal(got[name], array)


def raw_values(path: Path) -> dict[bytes, bytes]:
    """Every stored key and value, read through a separate LMDB environment.

    py-lmdb opens an environment once per process: close the cache first.
    """
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor()}
    finally:
        env.close()


def test_every_v2_dtype_round_trips(make_cache: MakeCache, tmp_path: Path) -> None:
    outputs = every_dtype()
    cache = make_cache(admit_after=1)
    assert cache.get(key_of(1)) is None
    assert cache.offer(key_of(1), outputs)
    assert_same(cache.get(key_of(1)), outputs)  # served from the queue before the flush
    assert cache.wait_flushed()
    assert_same(cache.get(key_of(1)), outputs)
    cache.close()
    # and from disk, by a fresh process-like instance
    assert_same(make_cache().get(key_of(1)), outputs)


def test_admission_writes_on_the_kth_offer(make_cache: MakeCache, tmp_path: Path) -> None:
    twice = make_cache(path=tmp_path / "k2", admit_after=2)
    assert not twice.offer(key_of(1), outputs_of(1))
    assert twice.wait_flushed()
    assert twice.get(key_of(1)) is None
    assert twice.stats().entries == 0
    assert twice.offer(key_of(1), outputs_of(1))
    assert twice.wait_flushed()
    assert_same(twice.get(key_of(1)), outputs_of(1))
    assert twice.stats().entries == 1

    once = make_cache(path=tmp_path / "k1", admit_after=1)
    assert once.offer(key_of(1), outputs_of(1))
    assert once.wait_flushed()
    assert once.stats().entries == 1
    once.close()
    assert len(raw_values(tmp_path / "k1")) == 1


def test_zipf_hit_rate_matches_admission_policy(make_cache: MakeCache) -> None:
    rng = np.random.default_rng(12)
    draws = rng.zipf(1.2, 200_000)
    trace = draws[draws <= 2_000][:20_000]
    assert len(trace) == 20_000
    admit_after = 2
    cache = make_cache(admit_after=admit_after, sketch_width=1 << 16)
    keys = {int(k): key_of(int(k)) for k in np.unique(trace)}
    hits = 0
    for k in trace.tolist():
        if cache.get(keys[k]) is not None:
            hits += 1
        else:
            cache.offer(keys[k], outputs_of(k))
    counts = np.bincount(trace)
    predicted = np.maximum(0, counts - admit_after).sum() / len(trace)
    rate = hits / len(trace)
    print(
        f"\nzipf a=1.2, {len(keys)} keys, {len(trace)} requests: hit rate {rate:.4f}, "
        f"predicted {predicted:.4f} (unbounded cache, K={admit_after})"
    )
    assert abs(rate - predicted) <= 0.02


def test_eviction_keeps_bytes_under_max(make_cache: MakeCache, tmp_path: Path) -> None:
    max_bytes = 100_000
    cache = make_cache(admit_after=1, max_bytes=max_bytes)
    hot = key_of(-1)
    cache.offer(hot, outputs_of(-1, 1000))
    for i in range(60):
        assert cache.offer(key_of(i), outputs_of(i, 1000))  # about 4 KB each
        assert cache.wait_flushed()
        assert cache.get(hot) is not None  # read often: never the oldest of a sample
        assert cache.stats().bytes_stored <= max_bytes
    stats = cache.stats()
    assert stats.evictions > 0
    cache.close()
    stored = raw_values(tmp_path / "cache")
    assert sum(map(len, stored.values())) == stats.bytes_stored <= max_bytes
    assert len(stored) == stats.entries
    assert hot in stored


def test_restart_keeps_entries_and_rebuilds_stats(make_cache: MakeCache) -> None:
    first = make_cache(admit_after=1)
    for i in range(30):
        first.offer(key_of(i), outputs_of(i))
    assert first.wait_flushed()
    before = first.stats()
    first.close()

    again = make_cache(admit_after=1)
    assert again.wait_flushed()
    after = again.stats()
    assert (after.entries, after.bytes_stored) == (before.entries, before.bytes_stored) != (0, 0)
    for i in range(30):
        assert_same(again.get(key_of(i)), outputs_of(i))


def test_restart_with_smaller_max_bytes_evicts_unread_first(make_cache: MakeCache) -> None:
    first = make_cache(admit_after=1)
    for i in range(40):
        first.offer(key_of(i), outputs_of(i, 1000))
    assert first.wait_flushed()
    first.close()
    smaller = make_cache(admit_after=1, max_bytes=50_000)
    assert smaller.wait_flushed()
    assert 0 < smaller.stats().bytes_stored <= 50_000


def test_corrupt_value_is_a_miss_and_deleted(make_cache: MakeCache, tmp_path: Path) -> None:
    path = tmp_path / "cache"
    first = make_cache(admit_after=1)
    for i in range(3):
        first.offer(key_of(i), outputs_of(i))
    assert first.wait_flushed()
    first.close()

    stored = raw_values(path)
    flipped = bytearray(stored[key_of(1)])
    flipped[-1] ^= 0x40  # one bit of the tensor bytes
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(key_of(0), b"garbage, not a cache value")
        txn.put(key_of(1), bytes(flipped))
    env.close()

    cache = make_cache(admit_after=1)
    assert cache.get(key_of(0)) is None
    assert cache.get(key_of(1)) is None
    assert_same(cache.get(key_of(2)), outputs_of(2))
    assert cache.wait_flushed()
    assert cache.stats().corrupt == 2
    assert cache.stats().entries == 1
    cache.close()
    assert sorted(raw_values(path)) == [key_of(2)]


def test_entries_expire(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache(admit_after=1, ttl_s=0.05)
    cache.offer(key_of(1), outputs_of(1))
    assert cache.get(key_of(1)) is not None  # at once, so a loaded machine cannot flake it
    cache.offer(key_of(2), outputs_of(2), ttl_s=60.0)  # per-entry TTL wins
    assert cache.wait_flushed()
    time.sleep(0.1)
    assert cache.get(key_of(1)) is None
    assert cache.get(key_of(2)) is not None
    assert cache.wait_flushed()
    assert cache.stats().expired == 1
    cache.close()
    assert sorted(raw_values(tmp_path / "cache")) == [key_of(2)]


def test_drop_digest_deletes_only_that_digest(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache(admit_after=1)
    for i in range(20):
        cache.offer(key_of(i, DIGEST), outputs_of(i))
        cache.offer(key_of(i, OTHER), outputs_of(i))
    assert cache.wait_flushed()
    cache.offer(key_of(99, DIGEST), outputs_of(99))  # still queued when dropped
    cache.drop_digest(DIGEST)
    assert cache.wait_flushed()
    assert cache.get(key_of(3, DIGEST)) is None
    assert cache.get(key_of(99, DIGEST)) is None
    assert cache.get(key_of(3, OTHER)) is not None
    assert cache.stats().entries == 20
    cache.close()
    stored = raw_values(tmp_path / "cache")
    assert {k[:PREFIX_BYTES] for k in stored} == {digest_prefix(OTHER)}
    assert len(stored) == 20


def test_map_full_degrades_without_raising(make_cache: MakeCache) -> None:
    cache = make_cache(admit_after=1, map_size=64 << 10)
    for i in range(10):
        cache.offer(key_of(i), outputs_of(i, 25_000))  # 100 KB each
        cache.wait_flushed()
    assert cache.degraded
    assert cache.reason is not None and "MapFull" in cache.reason
    assert cache.get(key_of(0)) is None
    assert not cache.offer(key_of(0), outputs_of(0))
    assert cache.stats().degraded


def test_uncreatable_directory_degrades_at_open(make_cache: MakeCache, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("a regular file, not a directory")
    cache = make_cache(path=tmp_path / "afile" / "cache", admit_after=1)
    assert cache.degraded
    assert cache.reason is not None and "cannot open" in cache.reason
    assert not cache.offer(key_of(1), outputs_of(1))
    assert cache.get(key_of(1)) is None
    assert not cache.wait_flushed(0.1)


def test_directory_removed_while_running(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache(admit_after=1)
    cache.offer(key_of(0), outputs_of(0))
    assert cache.wait_flushed()
    shutil.rmtree(tmp_path / "cache")
    for i in range(300):
        cache.offer(key_of(i), outputs_of(i, 100))
        cache.get(key_of(i // 2))
    cache.wait_flushed()
    # LMDB keeps its open (now unlinked) files: either it still works or it has degraded
    assert cache.degraded or cache.get(key_of(299)) is not None


def test_writer_behind_drops_offers_instead_of_blocking(make_cache: MakeCache) -> None:
    cache = make_cache(admit_after=1, start=False, max_pending_bytes=50_000)
    admitted = [cache.offer(key_of(i), outputs_of(i, 1000)) for i in range(20)]
    assert 0 < sum(admitted) < 20
    assert cache.stats().dropped == 20 - sum(admitted)
    cache.start()
    assert cache.wait_flushed()
    assert cache.stats().entries == sum(admitted)


def test_concurrent_readers_and_offers(make_cache: MakeCache) -> None:
    cache = make_cache(admit_after=1, max_bytes=200_000, flush_interval_s=0.001)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for k in rng.integers(0, 200, 2_000).tolist():
                got = cache.get(key_of(k))
                if got is None:
                    cache.offer(key_of(k), outputs_of(k, 100))
                else:
                    assert got["y"][0] == k
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert cache.wait_flushed()
    assert not cache.degraded
    assert cache.stats().bytes_stored <= 200_000


def test_print_lookup_time_for_4kb_input(make_cache: MakeCache) -> None:
    """Prints the in-process lookup time (key hashing + get); the aim is 20 us, not asserted."""
    cache = make_cache(admit_after=1)
    feed = {"x": np.random.default_rng(0).random(1024).astype(np.float32)}  # 4 KB
    outputs = {"y": np.ones(384, dtype=np.float32)}
    cache.offer(cache_key(DIGEST, feed, None), outputs)
    assert cache.wait_flushed()
    key = cache_key(DIGEST, feed, None)
    n = 10_000
    start = time.perf_counter()
    for _ in range(n):
        cache_key(DIGEST, feed, None)
    hashing = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for _ in range(n):
        cache.get(key)
    get = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for _ in range(n):
        assert cache.get(cache_key(DIGEST, feed, None)) is not None
    both = (time.perf_counter() - start) / n
    print(
        f"\nlookup of a 4 KB input: {both * 1e6:.1f} us "
        f"(key {hashing * 1e6:.1f} us + get of a 1.5 KB value {get * 1e6:.1f} us)"
    )


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = CacheSettings(path=tmp_path)
    assert replace(settings, admit_after=1).admit_after == 1
    with pytest.raises(AttributeError):
        settings.admit_after = 3  # type: ignore[misc]


def test_bad_settings_and_outputs_never_reach_the_disk(make_cache: MakeCache) -> None:
    with pytest.raises(InvalidCacheSettings, match="max_bytes is 0; accepted: >= 1"):
        CacheSettings(path=Path("x"), max_bytes=0)
    cache = make_cache(admit_after=1)
    assert not cache.offer(key_of(1), {"c": np.zeros(2, dtype=np.complex64)})  # logged, no raise
    assert cache.stats().dropped == 1
    assert cache.wait_flushed()
    assert cache.stats().entries == 0


def fill(make_cache: MakeCache, n: int = 5) -> None:
    cache = make_cache(admit_after=1)
    for i in range(n):
        cache.offer(key_of(i), outputs_of(i))
    assert cache.wait_flushed()
    cache.close()


def test_files_left_open_by_an_earlier_boot_start_empty(
    make_cache: MakeCache, tmp_path: Path
) -> None:
    fill(make_cache)
    # a process crash (same boot) loses nothing: LMDB's committed pages are in the page cache
    (tmp_path / "cache" / MARKER).write_text(boot_id())
    crashed = make_cache(admit_after=1)
    assert crashed.wait_flushed() and crashed.stats().entries == 5
    crashed.close()
    assert not (tmp_path / "cache" / MARKER).exists()  # a clean close removes the marker
    # a power loss (another boot) may have left damaged pages: start empty
    (tmp_path / "cache" / MARKER).write_text("another-boot")
    rebooted = make_cache(admit_after=1)
    assert rebooted.wait_flushed()
    assert not rebooted.degraded and rebooted.stats().entries == 0
    assert rebooted.get(key_of(1)) is None


def test_unreadable_or_marked_damaged_files_start_empty(
    make_cache: MakeCache, tmp_path: Path
) -> None:
    path = tmp_path / "cache"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"not an LMDB file" * 1000)
    cache = make_cache(admit_after=1)
    assert not cache.degraded
    assert cache.offer(key_of(1), outputs_of(1)) and cache.wait_flushed()
    cache.close()

    (path / "CORRUPT").touch()  # left by a run that met a damaged page
    again = make_cache(admit_after=1)
    assert again.wait_flushed() and not again.degraded
    assert again.stats().entries == 0 and not (path / "CORRUPT").exists()
