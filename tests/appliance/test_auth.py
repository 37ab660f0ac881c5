"""Bearer tokens with roles, the per-client limit, and job ownership."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.coordinator.async_jobs import JobRunner
from appliance.errors import ConfigError
from appliance.security.auth import OPEN, Caller, authenticate, parse_tokens, required_role
from cache.errors import JobNotFound
from cache.job import Job
from cache.job_store import JobStore
from runtime.codec import encode_request
from tests.conftest import StartNode
from tests.models import dense_model, put_model

INFER = "infer:" + "i" * 24
ADMIN = "admin:" + "a" * 24


def bearer(entry: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + entry.split(":", 1)[1]}


@pytest.mark.parametrize(
    ("path", "role"),
    [
        ("/v2/health/live", OPEN),
        ("/v2/health/ready", OPEN),
        ("/", OPEN),
        ("/v2/models/m/infer", "infer"),
        ("/v2/models/m", "infer"),
        ("/v2", "infer"),
        ("/v2/jobs/x", "infer"),
        ("/v2/repository/index", "admin"),
        ("/v2/cluster", "admin"),
        ("/v2/models/m/stats", "admin"),
        ("/metrics", "admin"),
        ("/internal/hop", "admin"),
    ],
)
def test_roles_per_path(path: str, role: str) -> None:
    assert required_role("GET", path, metrics_public=False) == role
    assert required_role("GET", "/metrics", metrics_public=True) == OPEN


def test_tokens_parse_and_compare(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text("# comment\n" + ADMIN + "\n")
    tokens = parse_tokens([INFER], str(file))
    assert [t.role for t in tokens] == ["infer", "admin"]
    assert authenticate(tokens, "Bearer " + "a" * 24).role == "admin"  # type: ignore[union-attr]
    assert authenticate(tokens, "Bearer nope") is None and authenticate(tokens, None) is None
    for bad in (["root:" + "x" * 20], ["infer:short"], ["nocolon"]):
        with pytest.raises(ConfigError, match="ROLE:TOKEN"):
            parse_tokens(bad, "")


async def test_the_api_asks_for_tokens_and_roles(start_node: StartNode, tmp_path: Path) -> None:
    put_model(tmp_path, "dense", dense_model())
    node = await start_node(tmp_path, wait=False, tokens=[INFER, ADMIN])
    client, url = node.client, node.url
    for _ in range(200):
        async with client.get(url + "/v2/health/ready") as response:  # open
            if response.status == 200:
                break
        await asyncio.sleep(0.02)
    body, length = encode_request({"x": np.ones((1, 4), np.float32)})
    headers = {"Inference-Header-Content-Length": str(length)}
    async with client.post(url + "/v2/models/dense/infer", data=body, headers=headers) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "bearer token" in (await r.json())["error"]
    async with client.post(
        url + "/v2/models/dense/infer",
        data=body,
        headers={**headers, **bearer("infer:" + "w" * 32)},
    ) as r:  # a token was given, and it is wrong: not "a bearer token is required"
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await r.json())["error"].startswith("token not accepted")
    async with client.post(
        url + "/v2/models/dense/infer", data=body, headers={**headers, **bearer(INFER)}
    ) as r:
        assert r.status == 200
    async with client.post(url + "/v2/repository/index", headers=bearer(INFER)) as r:
        assert r.status == 403 and "admin" in (await r.json())["error"]
    async with client.post(url + "/v2/repository/index", headers=bearer(ADMIN)) as r:
        assert r.status == 200
    async with client.get(url + "/metrics") as r:
        assert r.status == 401
    async with client.get(url + "/metrics", headers=bearer(ADMIN)) as r:
        assert r.status == 200


async def test_one_client_cannot_take_every_slot(start_node: StartNode, tmp_path: Path) -> None:
    put_model(tmp_path, "wide", dense_model(features=1500, units=1500))
    node = await start_node(tmp_path, max_concurrent_per_client=2, max_batch_size=1)
    body, length = encode_request({"x": np.ones((64, 1500), np.float32)})

    async def one() -> tuple[int, str | None]:
        async with node.client.post(
            node.url + "/v2/models/wide/infer",
            data=body,
            headers={"Inference-Header-Content-Length": str(length)},
        ) as r:
            await r.read()
            return r.status, r.headers.get("Retry-After")

    results = await asyncio.gather(*(one() for _ in range(8)))
    assert {s for s, _ in results} == {200, 429}
    assert all(retry is not None for status, retry in results if status == 429)


async def test_a_job_is_visible_to_the_token_that_submitted_it_and_to_admins(
    tmp_path: Path,
) -> None:
    release = asyncio.Event()

    async def run(job: Job) -> tuple[bytes, int | None]:
        await release.wait()
        return b"ok", None

    alice, mallory = Caller("alice", "infer"), Caller("mallory", "infer")
    root = Caller("r", "admin")
    runner = JobRunner(JobStore(tmp_path / "jobs"), run, workers=1, ttl_s=60)
    await runner.start()
    try:
        for job_id in ("j1", "j2"):
            job = Job(job_id, "m", None, "queued", time.time(), None, b"", None, "alice")
            await runner.submit(job)
        assert runner.get("j1", alice).id == "j1"
        with pytest.raises(JobNotFound, match="no job 'j1' for this token"):
            runner.get("j1", mallory)
        with pytest.raises(JobNotFound, match="no job 'j1' for this token"):
            await runner.cancel("j1", mallory)
        with pytest.raises(JobNotFound, match="no job 'nope' for this token"):
            runner.get("nope", alice)  # the same answer: nobody learns that others' jobs exist
        assert runner.get("j1", root).id == "j1"  # the admin role means everything
        assert (await runner.cancel("j2", root)).status == "cancelled"
    finally:
        release.set()
        await runner.close()
