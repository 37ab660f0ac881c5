"""The ring with real node processes on loopback: spans, failover, restarts, versions.

Requests carry ``Cache-Control: no-cache, no-store`` so that a result cache cannot answer for
the ring. Loads are bounded in count and time.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import Ring, http
from exporter.demo_model import build_demo_model
from exporter.export import export_model

SMALL = {"blocks": 6, "hidden": 64, "heads": 4, "ffn": 256, "vocab": 300}

pytestmark = pytest.mark.slow


def make_repo(repo: Path, seed: int = 0) -> Path:
    model = build_demo_model(**SMALL, seed=seed)
    export_model(model, repo, "demo", min_segment_bytes=0, source_label="test")
    return repo


def reference(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    session = ort.InferenceSession(build_demo_model(**SMALL, seed=seed).SerializeToString())
    return np.asarray(session.run(None, {"input_ids": ids})[0])


@pytest.fixture
def ring(tmp_path: Path) -> Iterator[Ring]:
    ring = Ring(tmp_path, make_repo(tmp_path / "repo"))
    ring.start_coordinator()
    yield ring
    ring.stop()


def metric_sum(url: str, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def run_load(
    ring: Ring,
    count: int,
    concurrency: int,
    ids: np.ndarray,
    on_progress: dict[int, threading.Event] | None = None,
) -> tuple[int, list[str]]:
    """``count`` requests from ``concurrency`` threads; returns (done, errors)."""
    errors: list[str] = []
    done = 0
    lock = threading.Lock()
    want = reference(ids)

    def one(_: int) -> None:
        nonlocal done
        try:
            got = ring.infer("demo", ids)
            np.testing.assert_allclose(got, want, atol=1e-4)
        except Exception as exc:  # counted, reported below
            detail = exc.read().decode() if hasattr(exc, "read") else ""
            with lock:
                errors.append(f"{type(exc).__name__}: {exc} {detail}")
        with lock:
            done += 1
            for mark, event in (on_progress or {}).items():
                if done >= mark:
                    event.set()

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    return done, errors


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


def test_kill_9_under_load_loses_nothing_and_a_restarted_node_takes_load_again(
    ring: Ring,
) -> None:
    for node in ("a", "b", "c", "d"):
        ring.start_node(node)
    ring.wait_members(4)
    ring.load("demo", stages=2, replicas=2)
    ring.wait_ready()
    view = http("GET", ring.url + "/v2/cluster")[1]
    victim = view["placements"]["demo"]["spans"][0]["replicas"][0]
    ids = np.arange(12, dtype=np.int64).reshape(1, 12)
    started = threading.Event()
    killer = threading.Thread(target=lambda: (started.wait(60), ring.kill(victim)))
    killer.start()
    done, errors = run_load(ring, 1000, 16, ids, {200: started})
    killer.join()
    assert done == 1000 and errors == [], errors[:3]
    assert metric_sum(ring.url, "appliance_ejections_total") >= 1
    # the same node id comes back (a new incarnation): it rejoins and gets its span again
    url = ring.start_node(victim)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        nodes = {n["node_id"]: n for n in http("GET", ring.url + "/v2/cluster")[1]["nodes"]}
        fresh = nodes[victim]["address"] == url  # the new incarnation, not the dead one
        if fresh and nodes[victim]["healthy"] and nodes[victim]["spans"]:
            break
        time.sleep(0.2)
    assert nodes[victim]["spans"], "the restarted node was not given its span again"
    before = metric_sum(url, "appliance_model_inferences_total")
    done, errors = run_load(ring, 200, 8, ids)
    assert errors == []
    assert metric_sum(url, "appliance_model_inferences_total") > before  # it takes load again


def test_a_hung_node_is_failed_over_within_the_deadline(ring: Ring) -> None:
    for node in ("a", "b", "c", "d"):
        ring.start_node(node)
    ring.wait_members(4)
    ring.load("demo", stages=2, replicas=2)
    ring.wait_ready()
    hung = http("GET", ring.url + "/v2/cluster")[1]["placements"]["demo"]["spans"][1]["replicas"][0]
    ring.kill(hung, signal.SIGSTOP)
    try:
        ids = np.arange(8, dtype=np.int64).reshape(1, 8)
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            got = ring.infer("demo", ids, timeout_us=5_000_000)
            latencies.append(time.monotonic() - started)
            np.testing.assert_allclose(got, reference(ids), atol=1e-4)
        assert max(latencies) < 5.0  # failed over inside the request's 5 s deadline
    finally:
        ring.kill(hung, signal.SIGCONT)


def test_a_node_with_another_version_is_never_in_a_route(ring: Ring, tmp_path: Path) -> None:
    ring.start_node("good")
    # "other" serves its own package of the same name and version but other bytes (seed 1)
    other_repo = make_repo(tmp_path / "other", seed=1)
    ring.start_node(
        "other", "--model-repo", str(other_repo), "--models", "demo", "--memory-budget", "1"
    )
    ring.wait_members(2)
    ring.load("demo", stages=1, replicas=1)
    ring.wait_ready()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # "other" loads its own package in the background
        view = http("GET", ring.url + "/v2/cluster")[1]
        nodes = {n["node_id"]: n for n in view["nodes"]}
        if nodes["other"]["spans"]:
            break
        time.sleep(0.2)
    assert nodes["other"]["spans"][0]["digest"] != view["models"]["demo"]
    ids = np.arange(6, dtype=np.int64).reshape(1, 6)
    for _ in range(10):
        np.testing.assert_allclose(ring.infer("demo", ids), reference(ids), atol=1e-5)
    ring.kill("good")
    time.sleep(2.5)  # silent past node_timeout_s
    status, body = http(
        "POST",
        ring.url + "/v2/models/demo/infer",
        {
            "inputs": [
                {"name": "input_ids", "datatype": "INT64", "shape": [1, 6], "data": list(range(6))}
            ]
        },
    )
    assert status == 503 and "replica" in body["error"]  # never answered by "other"


def test_a_restarted_coordinator_gets_its_nodes_and_placement_back(ring: Ring) -> None:
    for node in ("a", "b"):
        ring.start_node(node)
    ring.wait_members(2)
    ring.load("demo", stages=2, replicas=1)
    ring.wait_ready()
    placement = http("GET", ring.url + "/v2/cluster")[1]["placements"]["demo"]
    assert ring.coordinator is not None
    ring.coordinator.kill()
    ring.coordinator.wait()
    ring.start_coordinator()  # same port and state dir
    ring.wait_members(2)
    ring.wait_ready()
    view = http("GET", ring.url + "/v2/cluster")[1]
    assert view["placements"]["demo"] == placement
    ids = np.arange(10, dtype=np.int64).reshape(2, 5)
    np.testing.assert_allclose(ring.infer("demo", ids), reference(ids), atol=1e-5)


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

        def call(method: str, path: str, token: str | None, body: dict | None = None) -> int:  # type: ignore[type-arg]
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
