"""The result cache and async jobs through a real coordinator and node (loopback, bounded).

Jobs surviving a coordinator killed mid-way are in tests/faults/test_ring_faults.py."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.codec import decode_response, encode_request
from tests.support.faults.common import make_repo, metric_sum, reference
from tests.support.harness import Ring, http

pytestmark = pytest.mark.slow
HEADER = "Inference-Header-Content-Length"


@pytest.fixture
def ring(tmp_path: Path) -> Iterator[Ring]:
    ring = Ring(tmp_path, make_repo(tmp_path / "repo"))
    ring.start_coordinator()
    ring.start_node("a")
    ring.wait_members(1)
    ring.load("demo", stages=1, replicas=1)
    ring.wait_ready()
    yield ring
    ring.stop()


def post(ring: Ring, ids: np.ndarray, **headers: str) -> tuple[int, dict[str, str], bytes]:
    body, length = encode_request({"input_ids": ids})
    request = urllib.request.Request(
        f"{ring.url}/v2/models/demo/infer",
        data=body,
        method="POST",
        headers={HEADER: str(length), **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_a_frequent_result_is_answered_from_the_cache(ring: Ring) -> None:
    ids = np.arange(10, dtype=np.int64).reshape(1, 10)
    node = ring.node_urls["a"]
    outcomes = []
    for _ in range(4):
        status, headers, body = post(ring, ids)
        assert status == 200
        outcomes.append(headers["X-Appliance-Cache"])
        result = decode_response(body, int(headers[HEADER]))
        np.testing.assert_allclose(result.outputs["last_hidden_state"], reference(ids), atol=1e-5)
    # seen once: not kept; seen twice: kept (K = 2); then answered without the ring
    assert outcomes[:2] == ["miss", "miss"]
    time.sleep(0.1)  # the writer commits within a few ms
    status, headers, body = post(ring, ids)
    assert headers["X-Appliance-Cache"] == "hit"
    assert decode_response(body, int(headers[HEADER])).parameters == {"cache": "hit"}
    ran = metric_sum(node, "appliance_model_inferences_total")
    for _ in range(5):
        assert post(ring, ids)[1]["X-Appliance-Cache"] == "hit"
    assert metric_sum(node, "appliance_model_inferences_total") == ran  # no node was called
    # no-cache: not read (a bypass, said and counted so); other inputs: another key
    bypassed = metric_sum(ring.url, "appliance_cache_requests_total", outcome="bypass")
    assert post(ring, ids, **{"Cache-Control": "no-cache"})[1]["X-Appliance-Cache"] == "bypass"
    assert metric_sum(ring.url, "appliance_cache_requests_total", outcome="bypass") == bypassed + 1
    assert post(ring, ids[:, :9])[1]["X-Appliance-Cache"] == "miss"
    assert (
        post(ring, ids, **{"Cache-Control": "no-cache, no-store"})[1]["X-Appliance-Cache"]
        == "bypass"
    )


def submit(
    ring: Ring, ids: np.ndarray, prefer: str = "respond-async", model: str = "demo"
) -> tuple[int, dict[str, str], Any]:
    body, length = encode_request({"input_ids": ids})
    request = urllib.request.Request(
        f"{ring.url}/v2/models/{model}/infer",
        data=body,
        method="POST",
        headers={HEADER: str(length), "Prefer": prefer},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def wait_job(ring: Ring, location: str, timeout_s: float = 60) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        status, job = http("GET", ring.url + location)
        assert status == 200, job
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"{location} not finished in {timeout_s}s")


def test_submit_then_poll(ring: Ring) -> None:
    ids = np.arange(7, dtype=np.int64).reshape(1, 7)
    status, headers, body = submit(ring, ids)
    assert status == 202 and headers["Location"] == f"/v2/jobs/{body['id']}"
    assert body["status"] == "queued" and body["model"] == "demo"
    job = wait_job(ring, headers["Location"])
    assert job["status"] == "succeeded"
    output = job["result"]["outputs"][0]
    got = np.array(output["data"], np.float32).reshape(output["shape"])
    np.testing.assert_allclose(got, reference(ids), atol=1e-5)
    with urllib.request.urlopen(ring.url + headers["Location"] + "/result", timeout=10) as r:
        raw = decode_response(r.read(), int(r.headers[HEADER]))
    np.testing.assert_allclose(raw.outputs["last_hidden_state"], reference(ids), atol=1e-5)


def test_bad_job_requests(ring: Ring) -> None:
    ids = np.arange(7, dtype=np.int64).reshape(1, 7)
    assert http("GET", ring.url + "/v2/jobs/nope")[0] == 404
    assert http("DELETE", ring.url + "/v2/jobs/nope")[0] == 404
    status, _, body = submit(ring, ids, prefer="respond async")
    assert status == 400 and "Prefer" in body["error"]
    status, _, body = submit(ring, ids, model="nope")  # rejected before any 202
    assert status == 404
    bad = encode_request({"input_ids": ids.astype(np.int32)})
    request = urllib.request.Request(
        f"{ring.url}/v2/models/demo/infer",
        data=bad[0],
        method="POST",
        headers={HEADER: str(bad[1]), "Prefer": "respond-async"},
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == 400
