"""An asynchronous generation job survives its coordinator: submitted with ``Prefer:
respond-async``, the coordinator killed (SIGKILL) while the job runs, started again on the same
state folder: the job is run again from its stored request and completes with the answer the
sync call gives (greedy), on real coordinator and node processes and the tiny Llama."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.harness import Ring, http
from tests.support.tiny_llm import shared_tiny_package
from tests.support.tiny_ring import MODEL

pytestmark = pytest.mark.slow


@pytest.fixture
def ring(tmp_path: Any) -> Iterator[Ring]:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / MODEL).symlink_to(shared_tiny_package() / MODEL)
    ring = Ring(tmp_path, repo)
    try:
        ring.start_coordinator()
        for node in "ab":
            ring.start_node(node)
        ring.wait_members(2)
        ring.load(MODEL, 2, 1)
        ring.wait_ready()
        yield ring
    finally:
        ring.stop()


def submit(url: str, body: dict[str, Any]) -> str:
    request = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Prefer": "respond-async"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202
        return str(response.headers["Location"])


def job_state(ring: Ring, location: str) -> dict[str, Any]:
    status, job = http("GET", ring.url + location)
    assert status == 200, job
    return dict(job)


def test_an_async_generation_job_completes_after_its_coordinator_is_killed(ring: Ring) -> None:
    body = {"model": MODEL, "prompt": "a", "max_tokens": 900, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    status, sync = http("POST", ring.url + "/v1/completions", body, timeout=120)
    assert status == 200, sync
    location = submit(ring.url, body)
    end = time.monotonic() + 30
    while job_state(ring, location)["status"] == "queued" and time.monotonic() < end:
        time.sleep(0.02)
    assert job_state(ring, location)["status"] == "running"
    assert ring.coordinator is not None
    ring.coordinator.send_signal(signal.SIGKILL)
    ring.coordinator.wait(timeout=10)
    ring.start_coordinator()  # the same port and state folder; the nodes join it again
    ring.wait_ready(timeout_s=60)
    end = time.monotonic() + 120
    while (job := job_state(ring, location))["status"] in ("queued", "running"):
        assert time.monotonic() < end, job
        time.sleep(0.1)
    assert job["status"] == "succeeded", job
    assert job["result"]["choices"][0]["text"] == sync["choices"][0]["text"]
    assert job["result"]["usage"]["completion_tokens"] == 900
