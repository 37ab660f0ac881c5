"""The ring with real node processes on loopback: spans, placement, auth, plain models.

Requests carry ``Cache-Control: no-cache, no-store`` so that a result cache cannot answer for
the ring. The ring's faults (kill -9 and SIGSTOP under load, another version, a coordinator
killed and restarted) are in tests/faults/.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.faults.common import SMALL, make_repo, metric_sum, reference
from tests.support.harness import Ring, http

# make_repo, metric_sum, reference and SMALL stay importable from here for the other ring tests
__all__ = ["SMALL", "make_repo", "metric_sum", "reference"]

pytestmark = pytest.mark.slow


@pytest.fixture
def ring(tmp_path: Path) -> Iterator[Ring]:
    ring = Ring(tmp_path, make_repo(tmp_path / "repo"))
    ring.start_coordinator()
    yield ring
    ring.stop()


def test_three_nodes_three_spans_equal_the_whole_model_with_one_node_call_each(ring: Ring) -> None:
    for node in ("a", "b", "c"):
        ring.start_node(node)
    ring.wait_members(3)
    ring.load("demo", stages=3, replicas=1)
    ring.wait_ready()
    placement = http("GET", ring.url + "/v2/cluster")[1]["placements"]["demo"]
    assert len(placement["spans"]) == 3
    assert len({s["replicas"][0] for s in placement["spans"]}) == 3  # one span per node
    rng = np.random.default_rng(0)
    before = metric_sum(ring.url, "appliance_hop_attempts_total")
    for rows, tokens in [(1, 5), (3, 9), (2, 16)]:
        ids = rng.integers(0, 300, size=(rows, tokens)).astype(np.int64)
        np.testing.assert_allclose(ring.infer("demo", ids), reference(ids), atol=1e-5)
    assert metric_sum(ring.url, "appliance_hop_attempts_total") - before == 3


def test_a_node_gone_past_the_grace_period_has_its_span_placed_elsewhere(tmp_path: Path) -> None:
    ring = Ring(tmp_path, make_repo(tmp_path / "repo"))
    ring.start_coordinator("--replace-after-s", "2")
    try:
        for node in ("a", "b", "c"):
            ring.start_node(node)
        ring.wait_members(3)
        ring.load("demo", stages=2, replicas=1)
        ring.wait_ready()
        before = http("GET", ring.url + "/v2/cluster")[1]["placements"]["demo"]
        lost = before["spans"][0]["replicas"][0]
        ring.kill(lost)
        deadline = time.monotonic() + 30
        after = before
        while time.monotonic() < deadline:
            after = http("GET", ring.url + "/v2/cluster")[1]["placements"]["demo"]
            if after["version"] > before["version"]:
                break
            time.sleep(0.3)
        assert after["version"] > before["version"]
        assert lost not in {r for s in after["spans"] for r in s["replicas"]}
        ring.wait_ready()
        ids = np.arange(8, dtype=np.int64).reshape(1, 8)
        np.testing.assert_allclose(ring.infer("demo", ids), reference(ids), atol=1e-5)
    finally:
        ring.stop()


def test_a_ring_with_auth_on_serves_token_holders_only(tmp_path: Path) -> None:
    import json
    import urllib.error
    import urllib.request

    cluster, user = "c" * 32, "u" * 32
    # unsigned: the cluster token alone guards internal calls here (signing is tested apart)
    ring = Ring(tmp_path, make_repo(tmp_path / "repo"), signed=False)
    ring.start_coordinator(
        "--tokens", f"admin:{cluster}", f"infer:{user}", "--cluster-token", cluster
    )
    try:
        for node in ("a", "b"):
            ring.start_node(node, "--tokens", f"admin:{cluster}", "--cluster-token", cluster)

        def call(method: str, path: str, token: str | None, body: dict | None = None) -> int:
            headers = {"Content-Type": "application/json"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            data = json.dumps(body).encode() if body is not None else None
            request = urllib.request.Request(
                ring.url + path, data=data, method=method, headers=headers
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and call(
                "POST", "/v2/repository/models/demo/load", cluster, {"parameters": {"stages": 2}}
            )
            != 200
        ):
            time.sleep(0.3)  # until both nodes have joined (with the cluster token)
        ring.wait_ready()
        infer = {
            "inputs": [
                {"name": "input_ids", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]}
            ]
        }
        assert call("POST", "/v2/models/demo/infer", None, infer) == 401
        assert call("POST", "/v2/models/demo/infer", user, infer) == 200
        assert call("GET", "/v2/cluster", user) == 403
        assert call("GET", "/v2/cluster", cluster) == 200
        # a node refuses a hop without the cluster token
        node_url = ring.node_urls["a"]
        request = urllib.request.Request(node_url + "/internal/hop", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=10)
        assert error.value.code == 401
    finally:
        ring.stop()


def test_a_plain_model_onnx_is_placed_and_served_by_the_ring(tmp_path: Path) -> None:
    from tests.models import dense_model, put_model

    put_model(tmp_path / "plain", "dense", dense_model(features=4, units=3))
    ring = Ring(tmp_path, tmp_path / "plain")
    ring.start_coordinator()
    try:
        ring.start_node("a")
        ring.wait_members(1)
        ring.load("dense", stages=1, replicas=1)
        ring.wait_ready()
        status, answer = http(
            "POST",
            ring.url + "/v2/models/dense/infer",
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [1.0] * 8}]},
        )
        assert status == 200 and answer["outputs"][0]["shape"] == [2, 3]
        status, meta = http("GET", ring.url + "/v2/models/dense")
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    finally:
        ring.stop()
