"""The LMDB result cache: lock-free reads, admission by frequency, one batching writer thread.

The cache may lose entries but must never fail a request: any trouble with the directory or the
LMDB environment turns it into "no cache" (gets miss, offers are ignored) with one warning.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from cache.admission import AdmissionSketch
from cache.codec import decode_entry, encode_entry
from cache.entry_index import EntryIndex
from cache.errors import CorruptEntry, InvalidCacheSettings, UnsupportedTensor
from cache.keys import digest_prefix
from cache.open_marker import MARKER, mark_closed, mark_open, opened_in_earlier_boot

logger = logging.getLogger(__name__)

_DELETE = b""  # a pending "delete this key" (no stored value is empty: values carry a header)
_DATA_FILES = ("data.mdb", "lock.mdb")
_CORRUPT_MARK = "CORRUPT"  # left by a run that found damage: the next open starts empty


@dataclass(frozen=True)
class CacheSettings:
    path: Path
    map_size: int = 1 << 30
    max_bytes: int = 512 << 20  # high-water mark of stored value bytes; eviction keeps under it
    admit_after: int = 2  # K: stored once a key was offered K times in the window (1 = always)
    window: int = 100_000  # offers between halvings of the admission sketch
    ttl_s: float | None = None  # default time to live of entries (None = until evicted)
    flush_interval_s: float = 0.005  # the writer gathers queued writes this long per transaction
    sketch_width: int | None = None  # counters per sketch row (4 rows); None: >= window
    max_pending_bytes: int = 64 << 20  # queued, unwritten values; offers beyond it are dropped

    def __post_init__(self) -> None:
        for name in ("map_size", "max_bytes", "max_pending_bytes"):
            if getattr(self, name) < 1:
                raise InvalidCacheSettings(f"{name} is {getattr(self, name)}; accepted: >= 1")
        if self.flush_interval_s < 0 or (self.ttl_s is not None and self.ttl_s < 0):
            raise InvalidCacheSettings(
                f"flush_interval_s {self.flush_interval_s} and ttl_s {self.ttl_s} must be >= 0"
            )


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    offers: int
    admitted: int
    dropped: int  # admitted but not queued: too big, or the writer was too far behind
    evictions: int
    expired: int
    corrupt: int
    commits: int
    bytes_stored: int
    entries: int
    degraded: bool
    reason: str | None


class ResultCache:
    """Maps cache keys (see ``cache.keys``) to model outputs, in an LMDB environment."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self._reason: str | None = None
        self._env: lmdb.Environment | None = None
        self._sketch = AdmissionSketch(settings.admit_after, settings.window, settings.sketch_width)
        self._index = EntryIndex()
        self._lock = threading.Lock()  # guards the pending queue and the sketch
        self._pending: dict[bytes, bytes] = {}
        self._pending_bytes = 0
        self._inflight: dict[bytes, bytes] = {}  # the batch being committed, still readable
        self._drops: list[bytes] = []
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._queued = 0  # sequence numbers of queued and of committed work
        self._committed = 0
        self._scanned = False  # the writer rebuilt the index from disk and kept it in bounds
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._hits = self._misses = self._offers = self._admitted = self._dropped = 0
        self._evictions = self._expired = self._corrupt = self._commits = 0
        self._open()

    # -- lifecycle -------------------------------------------------------------------------

    def _open(self) -> None:
        path = self.settings.path
        if self.settings.max_bytes > self.settings.map_size:
            logger.warning(
                "result cache max_bytes %d exceeds map_size %d: it will fill the map and disable "
                "itself; set max_bytes to about half of map_size",
                self.settings.max_bytes,
                self.settings.map_size,
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
            if (path / _CORRUPT_MARK).exists():
                logger.warning("result cache at %s was found damaged; starting it empty", path)
                self._wipe(path)
            elif opened_in_earlier_boot(path):
                logger.warning(
                    "result cache at %s was open when the machine went down; unsynced writes "
                    "may have damaged it, starting it empty",
                    path,
                )
                self._wipe(path)
            self._env = self._open_env(path)
            mark_open(path)
        except (lmdb.CorruptedError, lmdb.InvalidError, lmdb.VersionMismatchError) as exc:
            # the cache may lose entries: start afresh rather than run without a cache
            logger.warning("result cache at %s is unreadable (%s); starting it empty", path, exc)
            try:
                self._wipe(path)
                self._env = self._open_env(path)
                mark_open(path)
            except (OSError, lmdb.Error) as again:
                self._degrade(f"cannot open the result cache at {path}: {again}")
        except (OSError, lmdb.Error) as exc:
            self._degrade(f"cannot open the result cache at {path}: {exc}")

    @staticmethod
    def _wipe(path: Path) -> None:
        for name in (*_DATA_FILES, _CORRUPT_MARK, MARKER):
            (path / name).unlink(missing_ok=True)

    def _open_env(self, path: Path) -> lmdb.Environment:
        # writemap=False: measured here, 50-put transactions of 4 KB values took 3.6 us/put
        # without it and 10 us/put with it (page faults on the growing sparse file), and a
        # write map turns a full disk into SIGBUS instead of an error we can degrade on.
        return lmdb.open(
            str(path),
            map_size=self.settings.map_size,
            subdir=True,
            sync=False,  # no fsync per commit: see open_marker for what a power loss costs
            metasync=False,
            writemap=False,
            readahead=False,  # random reads of a big map; readahead only evicts the page cache
            max_dbs=0,
        )

    def start(self) -> None:
        """Start the writer thread (it first rebuilds the size index by a scan)."""
        if self._thread is not None or self._env is None or self._closed:
            return
        self._thread = threading.Thread(target=self._run, name="result-cache-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued, stop the writer and close the environment."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
        if self._env is not None:
            with contextlib.suppress(lmdb.Error):
                self._env.sync(True)  # on disk now: the next boot may trust the files
                mark_closed(self.settings.path)
            self._env.close()
            self._env = None

    def __enter__(self) -> ResultCache:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def degraded(self) -> bool:
        """True once the cache turned itself off (see ``reason``)."""
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """Why the cache is degraded, or None."""
        return self._reason

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            offers=self._offers,
            admitted=self._admitted,
            dropped=self._dropped,
            evictions=self._evictions,
            expired=self._expired,
            corrupt=self._corrupt,
            commits=self._commits,
            bytes_stored=self._index.bytes_stored,
            entries=len(self._index),
            degraded=self.degraded,
            reason=self._reason,
        )

    # -- reads -----------------------------------------------------------------------------

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        """The stored outputs of ``key`` (read-only arrays), or None on a miss."""
        env = self._env
        if env is None or self._reason is not None:
            self._misses += 1
            return None
        # queued writes are visible at once, so a hit does not wait for the next flush
        value = self._pending.get(key)
        if value is None:
            value = self._inflight.get(key)
        if value is None:
            try:
                with env.begin() as txn:
                    value = txn.get(key)  # a copy: LMDB's buffer dies with the transaction
            except lmdb.ReadersFullError:
                value = None  # more reading threads than reader slots: a passing miss
            except lmdb.Error as exc:
                if not self._closed:  # closed under us at shutdown: just a miss
                    self._degrade(f"reading the result cache failed: {exc}", exc)
                value = None
        if not value:
            self._misses += 1
            return None
        try:
            outputs, expires_at = decode_entry(value)
        except CorruptEntry as exc:
            logger.warning("result cache entry %s is corrupt (%s); deleting it", key.hex(), exc)
            self._corrupt += 1
            self._miss_and_delete(key)
            return None
        if expires_at and expires_at <= time.time():
            self._expired += 1
            self._miss_and_delete(key)
            return None
        self._index.touch(key, time.monotonic())  # in memory: no write per hit
        self._hits += 1
        return outputs

    def _miss_and_delete(self, key: bytes) -> None:
        self._misses += 1
        with self._lock:
            # a value queued meanwhile is newer than the one found bad; keep it
            if key not in self._pending:
                self._pending[key] = _DELETE
                self._queued += 1
        self._wake.set()

    # -- writes (queued; the writer thread touches the disk) -------------------------------

    def offer(
        self, key: bytes, outputs: Mapping[str, np.ndarray], ttl_s: float | None = None
    ) -> bool:
        """Count an offer of ``key``; once admitted, queue ``outputs`` for writing and say True.

        Never blocks on disk: the outputs are encoded (copied once) here and written by the
        writer thread within ``flush_interval_s``. Never raises: outputs the v2 protocol cannot
        carry are logged and not stored (counted as ``dropped``).
        """
        if self._closed or self._env is None or self._reason is not None:
            return False
        with self._lock:
            self._offers += 1
            admitted = self._sketch.offer(key)
        if not admitted:
            return False
        ttl = self.settings.ttl_s if ttl_s is None else ttl_s
        try:
            value = encode_entry(outputs, 0.0 if ttl is None else time.time() + ttl)
        except UnsupportedTensor as exc:
            logger.warning("result cache cannot store these outputs: %s", exc)
            self._dropped += 1
            return False
        with self._lock:
            old = len(self._pending.get(key, _DELETE))
            too_far_behind = self._pending_bytes + len(value) > self.settings.max_pending_bytes
            if len(value) > self.settings.max_bytes or too_far_behind:
                self._dropped += 1
                return False
            self._pending[key] = value
            self._pending_bytes += len(value) - old
            self._queued += 1
            self._admitted += 1
        self._wake.set()
        return True

    def drop_digest(self, digest: str) -> None:
        """Delete every entry of model ``digest`` (in the background)."""
        prefix = digest_prefix(digest)
        with self._lock:
            for key in [k for k in self._pending if k.startswith(prefix)]:
                self._pending_bytes -= len(self._pending.pop(key))
            self._drops.append(prefix)
            self._queued += 1
        self._wake.set()

    def wait_flushed(self, timeout_s: float = 5.0) -> bool:
        """Wait until the index is rebuilt and everything queued before this call is committed.

        False on timeout or when nothing will ever be written (not started, degraded).
        """
        target = self._queued
        with self._done:
            self._done.wait_for(
                lambda: (
                    (self._scanned and self._committed >= target)
                    or self._thread is None
                    or self.degraded
                ),
                timeout_s,
            )
            return self._scanned and self._committed >= target and not self.degraded

    # -- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._rebuild_index()
        except lmdb.Error as exc:
            self._degrade(f"scanning the result cache failed: {exc}", exc)
        self._flush()  # evicts at once if max_bytes shrank since the last run
        with self._done:  # only now: wait_flushed must not see the store mid-eviction
            self._scanned = True
            self._done.notify_all()
        while True:
            self._wake.wait()
            if not self._stopping:
                time.sleep(self.settings.flush_interval_s)  # let more writes join this batch
            self._wake.clear()
            self._flush()
            if self._stopping and not self._pending and not self._drops:
                return

    def _rebuild_index(self) -> None:
        env = self._env
        if env is None:
            return
        with env.begin(buffers=True) as txn:
            for key, value in txn.cursor():
                self._index.add(bytes(key), len(value))

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
            self._inflight = batch
            drops, self._drops = self._drops, []
            self._pending_bytes = 0
            done = self._queued
        env = self._env
        over = self._index.bytes_stored > self.settings.max_bytes
        if env is not None and self._reason is None and (batch or drops or over):
            try:
                with env.begin(write=True) as txn:
                    self._write(txn, batch, drops)
                self._commits += 1
            except lmdb.Error as exc:
                self._degrade(f"writing the result cache failed ({type(exc).__name__}: {exc})", exc)
        self._inflight = {}
        with self._done:
            self._committed = done
            self._done.notify_all()

    def _write(self, txn: lmdb.Transaction, batch: dict[bytes, bytes], drops: list[bytes]) -> None:
        index = self._index
        for prefix in drops:
            cursor = txn.cursor()
            cursor.set_range(prefix)
            while (key := bytes(cursor.key())).startswith(prefix):  # b"" past the last key
                index.remove(key)
                cursor.delete()  # moves to the next key
        now = time.monotonic()
        for key, value in batch.items():
            if value:
                txn.put(key, value)
                index.add(key, len(value), now)  # just admitted: counts as recently used
            elif txn.delete(key):
                index.remove(key)
        while index.bytes_stored > self.settings.max_bytes:
            victim = index.victim()
            if victim is None:
                break
            txn.delete(victim)
            index.remove(victim)
            self._evictions += 1

    def _degrade(self, reason: str, error: BaseException | None = None) -> None:
        if isinstance(error, lmdb.CorruptedError | lmdb.PageNotFoundError):
            with contextlib.suppress(OSError):  # mark it so that the next open starts empty
                (self.settings.path / _CORRUPT_MARK).touch()
            reason += "; the next start will empty the cache"
        with self._lock:
            first = self._reason is None
            if first:
                self._reason = reason
                self._pending = {}
                self._pending_bytes = 0
        if first:
            logger.warning("result cache disabled, serving without it: %s", reason)
        with self._done:  # wake wait_flushed: nothing more will be written
            self._done.notify_all()
