"""The job runner over a real LMDB job store: run, fail, retry, cancel."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from appliance.coordinator.async_jobs import JobRunner
from cache.errors import JobNotFound
from cache.job import Job
from cache.job_store import JobStore


def job(n: int) -> Job:
    return Job(f"job{n}", "m", None, "queued", time.time(), None, b"{}", None)


async def wait_done(runner: JobRunner, job_id: str) -> Job:
    for _ in range(500):
        current = runner.get(job_id)
        if current.done:
            return current
        await asyncio.sleep(0.01)
    raise AssertionError(f"{job_id} not done")


async def test_jobs_run_fail_and_cancel(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def run(j: Job) -> tuple[bytes, int | None]:
        if j.id == "job0":
            await release.wait()  # holds the only worker
        if j.id == "job2":
            raise ValueError("bad values")
        return b"answer-" + j.id.encode(), None

    runner = JobRunner(JobStore(tmp_path / "jobs"), run, workers=1, ttl_s=60)
    await runner.start()
    try:
        for n in range(4):
            await runner.submit(job(n))
        await asyncio.sleep(0.05)
        assert runner.get("job0").status == "running"
        cancelled = await runner.cancel("job3")  # still queued behind job0
        assert cancelled.status == "cancelled" and cancelled.finished is not None
        release.set()
        assert (await wait_done(runner, "job1")).result == b"answer-job1"
        failed = await wait_done(runner, "job2")
        assert failed.status == "failed" and failed.error == "bad values"
        await asyncio.sleep(0.05)
        assert runner.get("job3").status == "cancelled"  # never ran
        with pytest.raises(JobNotFound):
            runner.get("nope")
    finally:
        await runner.close()


async def test_a_running_job_can_be_cancelled_and_transient_failures_retry(
    tmp_path: Path,
) -> None:
    attempts = {"flaky": 0}

    async def run(j: Job) -> tuple[bytes, int | None]:
        if j.id == "slow":
            await asyncio.sleep(30)
        attempts["flaky"] += 1
        if attempts["flaky"] < 3:
            raise ConnectionError("no live replica yet")
        return b"ok", None

    runner = JobRunner(
        JobStore(tmp_path / "jobs"),
        run,
        workers=2,
        ttl_s=60,
        transient=lambda exc: isinstance(exc, ConnectionError),
    )
    await runner.start()
    try:
        slow = Job("slow", "m", None, "queued", time.time(), None, b"{}", None)
        flaky = Job("flaky", "m", None, "queued", time.time(), None, b"{}", None)
        await runner.submit(slow)
        await runner.submit(flaky)
        await asyncio.sleep(0.05)
        assert (await runner.cancel("slow")).status == "cancelled"
        done = await wait_done(runner, "flaky")
        assert done.status == "succeeded" and attempts["flaky"] == 3
    finally:
        await runner.close()
