"""The durable job store: an LMDB environment of its own, written by one group-committing thread.

Jobs may never be lost, so every write is fsync'd (``sync=True``) before its caller resumes.
One flush costs about a millisecond, so it is paid off the event loop, in the writer thread,
and shared: every request waiting when a transaction starts is committed in that transaction
(group commit), then all of their futures are resolved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from cache.errors import InvalidJob, JobNotFound, JobStoreError
from cache.job import FINISHED, UNFINISHED, Job, check_job, decode_meta, encode_meta, meta_status

logger = logging.getLogger(__name__)

_MAX_BATCH = 1024  # requests per transaction: bounds one commit's latency and memory

Op = Callable[[lmdb.Transaction], Any]


@dataclass
class _Request:
    op: Op
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


class JobStore:
    """Jobs by id, in an LMDB environment at ``path`` opened for durable commits."""

    def __init__(self, path: Path, map_size: int = 1 << 30, result_ttl_s: float = 3600.0) -> None:
        self.path = path
        self.result_ttl_s = result_ttl_s
        self._commits = 0
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._closing = threading.Lock()  # no write is queued behind the writer's stop sentinel
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(
                str(path),
                map_size=map_size,
                subdir=True,
                sync=True,  # a job is committed to disk before submit() returns
                metasync=True,
                writemap=False,  # no stray-pointer writes into the map; errors, not SIGBUS
                max_dbs=3,
            )
            self._jobs = self._env.open_db(b"jobs")
            self._requests = self._env.open_db(b"requests")
            self._results = self._env.open_db(b"results")
        except (OSError, lmdb.Error) as exc:
            # unlike the cache, the store must not quietly run without its disk
            raise JobStoreError(
                f"cannot open the job store at {path}: {exc}; it needs a writable directory"
            ) from exc

    @property
    def commits(self) -> int:
        """Write transactions committed so far (one per group of waiting requests)."""
        return self._commits

    def flags(self) -> dict[str, object]:
        """The LMDB environment's flags (``sync`` is True: commits reach the disk)."""
        return dict(self._env.flags())

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="job-store-writer", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close the environment."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            if self._thread is not None:
                self._queue.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._env.close()

    # -- writes: each returns once its transaction is on disk ------------------------------

    async def submit(self, job: Job) -> None:
        """Store a new job; returns only after it is durably committed."""
        check_job(job)
        key, meta = _key(job.id), encode_meta(job)

        def op(txn: lmdb.Transaction) -> None:
            if txn.get(key, db=self._jobs) is not None:
                raise InvalidJob(f"job id {job.id!r} already exists; submit needs a new id")
            txn.put(key, meta, db=self._jobs)
            txn.put(key, job.request, db=self._requests)
            if job.result is not None:
                txn.put(key, job.result, db=self._results)

        await self._write(op)

    async def update(self, job: Job) -> None:
        """Store a job's new status, result and error, durably. The request is kept as stored."""
        check_job(job)
        key, meta = _key(job.id), encode_meta(job)

        def op(txn: lmdb.Transaction) -> None:
            if txn.get(key, db=self._jobs) is None:
                raise JobNotFound(f"job {job.id!r} is not stored; submit it before updating it")
            txn.put(key, meta, db=self._jobs)
            if job.result is None:
                txn.delete(key, db=self._results)
            else:
                txn.put(key, job.result, db=self._results)

        await self._write(op)

    async def delete(self, job_id: str) -> bool:
        """Remove a job and its bodies; False if there was none."""
        key = _key(job_id)
        return bool(await self._write(lambda txn: self._delete(txn, key)))

    async def expire(self, now: float | None = None) -> int:
        """Delete finished jobs that finished over ``result_ttl_s`` ago; how many were deleted."""
        cutoff = (time.time() if now is None else now) - self.result_ttl_s

        def op(txn: lmdb.Transaction) -> int:
            old = []
            for key, raw in txn.cursor(db=self._jobs):
                status, _, finished = meta_status(raw)
                if status in FINISHED and finished is not None and finished < cutoff:
                    old.append(bytes(key))
            for key in old:
                self._delete(txn, key)
            return len(old)

        return int(await self._write(op))

    def _delete(self, txn: lmdb.Transaction, key: bytes) -> bool:
        txn.delete(key, db=self._requests)
        txn.delete(key, db=self._results)
        return bool(txn.delete(key, db=self._jobs))

    async def _write(self, op: Op) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._closing:
            self._check_open()
            if self._thread is None:
                raise JobStoreError("the job store is not started; call start() before writing")
            self._queue.put(_Request(op, future, loop))
        # shielded: a cancelled caller does not undo a write already queued
        return await asyncio.shield(future)

    # -- reads: short read transactions, on the caller's thread ----------------------------

    def get(self, job_id: str) -> Job | None:
        """The stored job, bodies included, or None."""
        self._check_open()
        key = _key(job_id)
        with self._env.begin() as txn:
            meta = txn.get(key, db=self._jobs)
            if meta is None:
                return None
            return decode_meta(
                meta, txn.get(key, b"", db=self._requests), txn.get(key, db=self._results)
            )

    def unfinished(self) -> list[Job]:
        """Queued and running jobs, oldest first: what to resume after a restart."""
        self._check_open()
        jobs = []
        with self._env.begin() as txn:
            for key, meta in txn.cursor(db=self._jobs):
                status, _, _ = meta_status(meta)
                if status in UNFINISHED:
                    request = txn.get(key, b"", db=self._requests)
                    jobs.append(decode_meta(meta, request, txn.get(key, db=self._results)))
        jobs.sort(key=lambda job: (job.created, job.id))
        return jobs

    def _check_open(self) -> None:
        if self._closed:
            raise JobStoreError("the job store is closed; open a new JobStore to use it again")

    # -- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[_Request] = []
            item = self._queue.get()  # block for the first, then take whatever else waits
            while item is not None:
                batch.append(item)
                if len(batch) >= _MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            else:
                stop = True  # the sentinel comes last: close() queues nothing after it
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[_Request]) -> None:
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            with self._env.begin(write=True) as txn:
                for request in batch:
                    try:
                        outcomes.append((request.op(txn), None))
                    except JobStoreError as exc:  # checked before the op wrote anything
                        outcomes.append((None, exc))
            self._commits += 1
        except Exception as exc:  # lmdb.Error or a bug: fail every waiter, never hang them
            logger.exception("job store commit of %d requests failed", len(batch))
            failure = JobStoreError(f"writing the job store at {self.path} failed: {exc}")
            outcomes = [(None, failure)] * len(batch)
        for request, (value, error) in zip(batch, outcomes, strict=True):
            # RuntimeError: that event loop is closed, so nobody is waiting any more
            with contextlib.suppress(RuntimeError):
                request.loop.call_soon_threadsafe(_settle, request.future, value, error)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


def _key(job_id: str) -> bytes:
    return job_id.encode()
