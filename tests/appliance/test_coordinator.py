"""The coordinator in process, with real ring nodes on port 0: Triton's client against it, its
statistics, and placements that cannot fit."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http.aio as triton_http

from exporter.package_writer import write_package
from runtime.codec import encode_request
from tests.conftest import StartCoordinator
from tests.models import dense_reference, dense_segments


def two_span_repo(repo: Path) -> Path:
    write_package(repo, "dense2", 1, list(dense_segments()), source="test")
    return repo


async def test_triton_client_infers_through_two_spans_and_reads_the_statistics(
    tmp_path: Path, start_coordinator: StartCoordinator
) -> None:
    ring = await start_coordinator(two_span_repo(tmp_path / "repo"), nodes=2, cache_admit_after=2)
    await ring.service.load("dense2", 2, 1)
    client = triton_http.InferenceServerClient(ring.url.removeprefix("http://"))
    try:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        for _ in range(3):  # the third is a cache hit (admitted on the second)
            request = triton_http.InferInput("x", [2, 4], "FP32")
            request.set_data_from_numpy(x, binary_data=True)
            result = await client.infer("dense2", [request])
            np.testing.assert_allclose(result.as_numpy("y"), dense_reference(x), rtol=1e-5)
        stats = (await client.get_inference_statistics("dense2"))["model_stats"][0]
        assert stats["name"] == "dense2" and stats["version"] == "1"
        assert stats["inference_count"] == 6  # rows answered, the cached ones included
        assert stats["execution_count"] == 2  # hops into the ring
        inference = stats["inference_stats"]
        assert inference["success"]["count"] == 3 and inference["fail"]["count"] == 0
        assert inference["cache_hit"]["count"] == 1 and inference["cache_miss"]["count"] == 2
        assert inference["compute_infer"]["count"] == 2 and inference["compute_infer"]["ns"] > 0
        config = await client.get_model_config("dense2")  # Triton's shape, as a node's is
        assert config["max_batch_size"] == 32
        assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]
        assert config["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": [3]}]
        every = await client.get_inference_statistics()
        assert [m["name"] for m in every["model_stats"]] == ["dense2"]
        with pytest.raises(Exception, match="no version '7'"):
            await client.get_inference_statistics("dense2", "7")
    finally:
        await client.close()


async def test_a_model_no_node_can_hold_is_507_not_a_retry_later(
    tmp_path: Path, start_coordinator: StartCoordinator
) -> None:
    ring = await start_coordinator(
        two_span_repo(tmp_path / "repo"), nodes=2, node_settings={"memory_budget": 1000}
    )
    async with ring.client.post(
        ring.url + "/v2/repository/models/dense2/load", json={"parameters": {"stages": 2}}
    ) as response:
        assert response.status == 507
        assert "Retry-After" not in response.headers
        message = (await response.json())["error"]
    assert "cannot place dense2" in message and "largest free budget" in message
    async with ring.client.post(
        ring.url + "/v2/repository/models/dense2/load", json={"parameters": {"stages": 3}}
    ) as response:  # a request that is wrong in itself: 400, naming what is accepted
        assert response.status == 400
        assert "between 1 and the segment count (2)" in (await response.json())["error"]


async def test_one_request_id_from_the_coordinators_log_to_every_hop(
    tmp_path: Path, start_coordinator: StartCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    ring = await start_coordinator(two_span_repo(tmp_path / "repo"), nodes=2, access_log=True)
    await ring.service.load("dense2", 2, 1)
    caplog.set_level(logging.INFO, logger="appliance.access")
    body, length = encode_request({"x": np.ones((1, 4), np.float32)})
    headers = {
        "Inference-Header-Content-Length": str(length),
        "X-Request-Id": "trace-me-42",
        "Cache-Control": "no-cache",
    }
    async with ring.client.post(
        ring.url + "/v2/models/dense2/infer", data=body, headers=headers
    ) as r:
        assert r.status == 200 and r.headers["X-Request-Id"] == "trace-me-42"
    lines = [
        r.getMessage() for r in caplog.records if getattr(r, "request_id", None) == "trace-me-42"
    ]
    assert sum("/v2/models/dense2/infer" in line for line in lines) == 1  # the coordinator's
    assert sum("/internal/hop" in line for line in lines) == 2  # each span's node
    headers["X-Request-Id"] = "not a token\tat all"  # not sent on as a header: a new id
    async with ring.client.post(
        ring.url + "/v2/models/dense2/infer", data=body, headers=headers
    ) as r:
        assert r.status == 200 and r.headers["X-Request-Id"] != headers["X-Request-Id"]


async def test_a_stale_placement_is_placed_again_once_after_its_grace_and_logged_once(
    tmp_path: Path, start_coordinator: StartCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    """A restarted coordinator whose placements.json names a node that never comes back: it
    waits replace_after_s from its own start (not "gone since forever"), places the model on
    the nodes there are, and says so once, not every second."""
    repo = two_span_repo(tmp_path / "repo")
    state = tmp_path / "coordinator-0"  # the fixture's state dir of its first coordinator
    state.mkdir()
    spans = [
        {"span": 0, "first": 0, "last": 0, "bytes": 1, "replicas": ["ghost"]},
        {"span": 1, "first": 1, "last": 1, "bytes": 1, "replicas": ["n1"]},
    ]
    (state / "placements.json").write_text(json.dumps({"dense2": {"version": 3, "spans": spans}}))
    caplog.set_level(logging.INFO, logger="appliance.coordinator")
    ring = await start_coordinator(repo, nodes=2, replace_after_s=1.5)
    assert ring.service.placements["dense2"].spans[0].replicas == ("ghost",)
    await asyncio.sleep(1.0)  # within the grace counted from the coordinator's start
    assert ring.service.placements["dense2"].version == 3
    for _ in range(100):
        if ring.service.placements["dense2"].version == 4:
            break
        await asyncio.sleep(0.1)
    placed = ring.service.placements["dense2"]
    assert placed.version == 4 and "ghost" not in [n for s in placed.spans for n in s.replicas]
    await asyncio.sleep(1.5)  # more reconcile passes: nothing more to say
    gone = [r for r in caplog.records if "gone for over" in r.getMessage()]
    assert len(gone) == 1, [r.getMessage() for r in gone]


async def test_placing_again_that_fails_backs_off_and_says_so_once(
    tmp_path: Path, start_coordinator: StartCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    repo = two_span_repo(tmp_path / "repo")
    state = tmp_path / "coordinator-0"
    state.mkdir()
    spans = [{"span": 0, "first": 0, "last": 1, "bytes": 1, "replicas": ["ghost"]}]
    (state / "placements.json").write_text(json.dumps({"dense2": {"version": 1, "spans": spans}}))
    caplog.set_level(logging.INFO, logger="appliance.coordinator")
    ring = await start_coordinator(
        repo, nodes=1, replace_after_s=0.5, node_settings={"memory_budget": 1000}
    )
    await asyncio.sleep(5.0)
    failed = [
        r.getMessage() for r in caplog.records if "placing dense2 again failed" in r.getMessage()
    ]
    assert len(failed) == 1 and "cannot place dense2" in failed[0], failed
    retry = ring.service.upkeep._replace_retry["dense2"]
    assert 2 <= retry.attempts <= 4  # 1 s, 2 s, 4 s apart, not one a second
