"""Asynchronous inference: submit (durably), run on a bounded pool of workers, poll, cancel.

A job is answered 202 only once the job store (sync LMDB, group commit) holds it; after a crash
the jobs that were queued or running are queued again at start, so none answered 202 is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from appliance.security.auth import ANONYMOUS, Caller
from cache.errors import JobNotFound
from cache.job import Job
from cache.job_store import JobStore

log = logging.getLogger(__name__)

RunJob = Callable[[Job], Coroutine[Any, Any, tuple[bytes, int | None]]]


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        run: RunJob,
        workers: int,
        ttl_s: float,
        transient: Callable[[Exception], bool] = lambda _: False,
        retry_window_s: float = 120.0,
    ) -> None:
        self.store = store
        # failures worth waiting out (no live replica yet, overloaded): the job is queued again
        self._transient = transient
        self._retry_window_s = retry_window_s
        self._attempts: dict[str, int] = {}
        self._finished: dict[str, int] = {"succeeded": 0, "failed": 0, "cancelled": 0}
        self._run = run
        self._workers_count = max(1, workers)
        self._ttl_s = ttl_s
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._running: dict[str, asyncio.Task[tuple[bytes, int | None]]] = {}
        self._cancelled: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.store.start()
        resumed = 0
        for job in self.store.unfinished():  # oldest first
            if job.status != "queued":
                job.status = "queued"
                await self.store.update(job)
            self._queue.put_nowait(job.id)
            resumed += 1
        if resumed:
            log.info("resumed %d job(s) left queued or running by the previous run", resumed)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._work()) for _ in range(self._workers_count)]
        self._tasks.append(loop.create_task(self._expire_forever()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.close()

    def counts(self) -> dict[str, int]:
        """Jobs by status: queued and running from memory, finished ones since start."""
        return {"queued": self._queue.qsize(), "running": len(self._running), **self._finished}

    async def submit(self, job: Job) -> None:
        await self.store.submit(job)  # durable before the caller answers 202
        self._queue.put_nowait(job.id)

    def get(self, job_id: str, caller: Caller = ANONYMOUS) -> Job:
        """The job, if ``caller`` may see it; the same 404 whether it does not exist or is
        another token's (which tells nobody that someone else's job exists)."""
        job = self.store.get(job_id)
        if job is None or not caller.may_see(job.owner):
            for_whom = " for this token" if caller.id else ""
            raise JobNotFound(
                f"no job {job_id!r}{for_whom} (finished jobs are kept {self._ttl_s:.0f} s)"
            )
        return job

    async def cancel(self, job_id: str, caller: Caller = ANONYMOUS) -> Job:
        job = self.get(job_id, caller)
        if job.done:
            return job
        task = self._running.get(job_id)
        if task is not None:
            self._cancelled.add(job_id)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(task)
            for _ in range(500):  # the worker records "cancelled" right after the task ends
                job = self.get(job_id, caller)
                if job.done:
                    break
                await asyncio.sleep(0.01)
            return job
        job.status, job.finished = "cancelled", time.time()
        await self.store.update(job)
        return job

    async def _work(self) -> None:
        while True:
            job_id = await self._queue.get()
            job = self.store.get(job_id)
            if job is None or job.status != "queued":
                continue  # cancelled or expired meanwhile
            job.status = "running"
            await self.store.update(job)
            task = asyncio.get_running_loop().create_task(self._run(job))
            self._running[job_id] = task
            try:
                job.result, job.result_header_length = await asyncio.shield(task)
                job.status = "succeeded"
            except asyncio.CancelledError:
                if job_id not in self._cancelled:
                    task.cancel()
                    raise  # shutting down: the job stays "running" and is resumed at start
                job.status = "cancelled"
            except Exception as exc:  # the same typed errors a sync call would answer
                if self._transient(exc) and time.time() - job.created < self._retry_window_s:
                    await self._retry_later(job, exc)
                    continue
                job.status, job.error = "failed", str(exc)
            finally:
                self._running.pop(job_id, None)
                self._cancelled.discard(job_id)
            self._attempts.pop(job_id, None)
            job.finished = time.time()
            await self.store.update(job)
            self._finished[job.status] = self._finished.get(job.status, 0) + 1

    async def _retry_later(self, job: Job, exc: Exception) -> None:
        attempt = self._attempts.get(job.id, 0) + 1
        self._attempts[job.id] = attempt
        delay = min(5.0, 0.25 * 2 ** (attempt - 1))
        log.info("job %s: %s; retrying in %.2fs", job.id, exc, delay)
        job.status = "queued"
        await self.store.update(job)
        asyncio.get_running_loop().call_later(delay, self._queue.put_nowait, job.id)

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, max(1.0, self._ttl_s / 10)))
            removed = await self.store.expire()
            if removed:
                log.info("expired %d finished job(s)", removed)
