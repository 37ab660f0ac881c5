"""The durable job store: round trips, group commit, restart, expiry, and surviving kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from cache.errors import InvalidJob, JobNotFound, JobStoreError
from cache.job import Job
from cache.job_store import JobStore

REPO = Path(__file__).resolve().parents[2]

OpenStore = Callable[..., Awaitable[JobStore]]


@pytest.fixture
async def open_store(tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Started stores under tmp_path/jobs; all closed at the end of the test."""
    opened: list[JobStore] = []

    async def open_(**kwargs: float) -> JobStore:
        store = JobStore(tmp_path / "jobs", **kwargs)  # type: ignore[arg-type]
        store.start()
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()


def make_job(i: int, status: str = "queued", created: float | None = None) -> Job:
    return Job(
        id=f"job-{i:04d}",
        model="minilm",
        version="1",
        status=status,
        created=time.time() if created is None else created,
        finished=None,
        request=b'{"inputs": []}' + bytes([i % 256]) * 100,
        header_length=14,
    )


async def test_submit_get_update_round_trip(open_store: OpenStore) -> None:
    store = await open_store()
    job = make_job(1)
    await store.submit(job)
    assert store.get(job.id) == job
    assert store.get("job-none") is None

    done = replace(job, status="succeeded", finished=time.time(), result=b"\x00" * 5000)
    done.result_header_length = 12
    await store.update(done)
    assert store.get(job.id) == done

    failed = replace(done, status="failed", result=None, error="model exploded")
    await store.update(failed)
    stored = store.get(job.id)
    assert stored == failed
    assert stored is not None and stored.public() == {
        "id": job.id,
        "model": "minilm",
        "kind": "infer",
        "status": "failed",
        "created": job.created,
        "finished": done.finished,
        "error": "model exploded",
    }
    assert "error" not in job.public()


async def test_bad_writes_say_what_is_accepted(open_store: OpenStore) -> None:
    store = await open_store()
    await store.submit(make_job(1))
    with pytest.raises(InvalidJob, match="already exists"):
        await store.submit(make_job(1))
    with pytest.raises(JobNotFound, match="submit it before"):
        await store.update(make_job(2))
    with pytest.raises(InvalidJob, match="accepted: queued, running"):
        await store.submit(make_job(3, status="exploded"))
    # one bad request in a group does not fail the others committed with it
    results = await asyncio.gather(
        store.submit(make_job(4)), store.update(make_job(5)), return_exceptions=True
    )
    assert results[0] is None and isinstance(results[1], JobNotFound)
    assert store.get(make_job(4).id) is not None


async def test_env_is_opened_for_durable_commits(open_store: OpenStore) -> None:
    store = await open_store()
    flags = store.flags()
    assert flags["sync"] is True
    assert flags["metasync"] is True


async def test_concurrent_submits_share_commits(open_store: OpenStore) -> None:
    store = await open_store()
    before = store.commits
    await asyncio.gather(*(store.submit(make_job(i)) for i in range(200)))
    commits = store.commits - before
    print(f"\n200 concurrent submits: {commits} commits")
    assert commits <= 20
    assert all(store.get(make_job(i).id) is not None for i in range(200))


async def test_unfinished_after_reopen_oldest_first(open_store: OpenStore) -> None:
    store = await open_store()
    statuses = ["running", "succeeded", "queued", "failed", "queued", "cancelled", "running"]
    for i, status in enumerate(statuses):
        await store.submit(make_job(i, status, created=1000.0 - i))  # newest submitted first
    await store.close()

    again = await open_store()
    unfinished = again.unfinished()
    assert [job.status for job in unfinished] == ["running", "queued", "queued", "running"]
    assert [job.created for job in unfinished] == sorted(job.created for job in unfinished)
    assert unfinished[0] == make_job(6, "running", created=994.0)


async def test_expire_deletes_only_old_finished_jobs(open_store: OpenStore) -> None:
    store = await open_store(result_ttl_s=60.0)
    now = 10_000.0
    cases = {
        "old-done": ("succeeded", now - 120),
        "old-failed": ("failed", now - 61),
        "new-done": ("succeeded", now - 30),
        "old-queued": ("queued", None),
        "old-running": ("running", None),
    }
    for name, (status, finished) in cases.items():
        job = replace(make_job(0, status, created=now - 500), id=name, finished=finished)
        await store.submit(job)
    assert await store.expire(now) == 2
    kept = {name for name in cases if store.get(name) is not None}
    assert kept == {"new-done", "old-queued", "old-running"}
    assert await store.expire(now) == 0


async def test_delete_and_closed_store(open_store: OpenStore) -> None:
    store = await open_store()
    await store.submit(make_job(1))
    assert await store.delete(make_job(1).id)
    assert not await store.delete(make_job(1).id)
    assert store.get(make_job(1).id) is None
    await store.close()
    with pytest.raises(JobStoreError, match="closed"):
        await store.submit(make_job(2))
    with pytest.raises(JobStoreError, match="closed"):
        store.get(make_job(2).id)


async def test_not_started_and_unopenable(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs")
    with pytest.raises(JobStoreError, match="call start"):
        await store.submit(make_job(1))
    await store.close()
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(JobStoreError, match="writable directory"):
        JobStore(tmp_path / "afile" / "jobs")


CHILD = """
import asyncio, sys, time
from pathlib import Path
from cache.job import Job
from cache.job_store import JobStore

async def main() -> None:
    store = JobStore(Path(sys.argv[1]))
    store.start()
    for i in range(50):
        job = Job(id=f"job-{i}", model="m", version=None, status="queued", created=time.time(),
                  finished=None, request=bytes([i]) * 2000, header_length=None)
        await store.submit(job)
        print(job.id, flush=True)
    await asyncio.sleep(60)  # the parent kills it long before

asyncio.run(main())
"""


async def test_no_job_lost_when_killed(tmp_path: Path) -> None:
    path = tmp_path / "jobs"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.stdout is not None
    printed = []
    for line in child.stdout:
        printed.append(line.decode().strip())
        if len(printed) == 20:
            os.kill(child.pid, signal.SIGKILL)  # mid-way: the child is still submitting
            break
    # ids it printed between our last read and the kill are acknowledged too
    printed += [line.decode().strip() for line in child.stdout if line.endswith(b"\n")]
    assert child.wait(10) == -signal.SIGKILL
    print(f"\nchild acknowledged {len(printed)} of 50 jobs before SIGKILL")

    store = JobStore(path)
    try:
        for job_id in printed:
            job = store.get(job_id)
            assert job is not None, f"{job_id} was acknowledged but is lost"
            assert job.request == bytes([int(job_id.split("-")[1])]) * 2000
    finally:
        await store.close()
