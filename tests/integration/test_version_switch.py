"""A new version switches the whole pipeline with no failed request (real node processes, the
result cache bypassed): side by side, rolling where memory holds one version, a failed warm-up
that leaves v1 serving, rollback by name, and a coordinator restarted in between."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.support.harness import Ring, http
from tests.support.switch import export_version, reference, switch_under_load

IDS = (np.arange(12, dtype=np.int64).reshape(1, 12) * 7) % 300
LONG_IDS = (np.arange(4096, dtype=np.int64).reshape(1, 4096) * 7) % 300  # ~0.3 s in process
V1_SEED, V2_SEED = 0, 1
# one span of the switch model needs ~152 MiB as placement counts it (150 MiB fixed + 1.15 x
# its ~2 MB): this budget holds one span and not two
ONE_SPAN_BUDGET = 170_000_000


def _refs() -> dict[str, np.ndarray]:
    refs = {"v1": reference(IDS, V1_SEED), "v2": reference(IDS, V2_SEED)}
    assert not np.allclose(refs["v1"], refs["v2"], atol=1e-3)  # the versions tell apart
    return refs


def _cluster(ring: Ring) -> dict:
    return http("GET", ring.url + "/v2/cluster")[1]


def _digest(ring: Ring) -> str:
    return str(_cluster(ring)["models"]["demo"]["serving_digest"])


def _start(tmp_path: Path, nodes: list[str], replicas: int, *node_flags: str) -> Ring:
    repo = export_version(tmp_path / "repo", 1, V1_SEED)
    ring = Ring(tmp_path, repo)
    ring.start_coordinator("--replace-after-s", "0", "--drain-timeout-s", "20")
    for node in nodes:
        ring.start_node(node, *node_flags)
    ring.wait_members(len(nodes))
    ring.load("demo", stages=2, replicas=replicas)
    ring.wait_ready()
    return ring


def _assert_clean_switch(result, old: str, new: str) -> None:  # noqa: ANN001
    assert result.status == 200, result.body
    assert result.count("error") == 0, result.errors
    assert result.count("wrong") == 0, result.errors  # never a mix of v1's and v2's spans
    assert set(result.after) == {new}, result.after  # sent after the load returned: all new
    assert result.before[old] > 0 and result.after[new] > 0


def test_switch_side_by_side_then_rollback_by_name_under_load(tmp_path: Path) -> None:
    ring = _start(tmp_path, ["a", "b"], 1)
    try:
        refs = _refs()
        v1 = _digest(ring)
        export_version(ring.repo, 2, V2_SEED)
        status, index = http("POST", ring.url + "/v2/repository/index", {})
        rows = {r["version"]: r for r in index if r["name"] == "demo"}
        assert rows["1"]["state"] == "READY" and rows["2"]["state"] == "UNAVAILABLE"
        assert "not loaded" in rows["2"]["reason"]
        status, meta = http("GET", ring.url + "/v2/models/demo")
        assert meta["parameters"]["serving_version"] == "1"
        assert {v["version"] for v in meta["parameters"]["versions"]} == {"1", "2"}
        status, body = http("GET", ring.url + "/v2/models/demo/versions/2")
        assert status == 404 and "serving: 1" in body["error"], body

        urls = list(ring.node_urls.values())
        v2 = _v2_digest(ring)
        long = (LONG_IDS, {"v1": reference(LONG_IDS, V1_SEED), "v2": reference(LONG_IDS, V2_SEED)})
        result = switch_under_load(ring.url, urls, IDS, refs, v1, v2, {}, long=long)
        _assert_clean_switch(result, "v1", "v2")
        assert result.long["v1"] > 0 and not result.long.keys() - {"v1", "v2"}, result.long
        # v1 kept working on the nodes while v2 was loaded, and had requests in flight at the
        # flip (they finished on it: none failed, none was answered by a mix)
        assert result.old_busy_samples > 0, (result.node_samples, result.during)
        log = (tmp_path / "coordinator.log").read_text()
        finishing = [line for line in log.splitlines() if "in flight finish on it" in line]
        assert finishing and not finishing[0].split("v1: ")[1].startswith("0 request"), finishing
        assert _digest(ring) == v2
        cluster = _cluster(ring)
        assert cluster["models"]["demo"]["serving_version"] == "2"
        # the old slots go once drained, and the node reports only v2's spans
        for node in cluster["nodes"]:
            assert {s["digest"] for s in node["spans"]} <= {v2, v1}

        back = switch_under_load(ring.url, urls, IDS, refs, v2, v1, {"version": "1"})
        _assert_clean_switch(back, "v2", "v1")
        assert _digest(ring) == v1
        status, body = http("POST", ring.url + "/v2/repository/models/demo/load",
                            {"parameters": {"allow_downtime": "yes"}})  # fmt: skip
        assert status == 400 and "allow_downtime" in body["error"]
        status, body = http("POST", ring.url + "/v2/repository/models/demo/load",
                            {"parameters": {"version": "one"}})  # fmt: skip
        assert status == 400 and "version" in body["error"]
    finally:
        ring.stop()


def _v2_digest(ring: Ring) -> str:
    manifest = json.loads((ring.repo / "demo" / "2" / "manifest.json").read_text())
    return str(manifest["digest"])


def test_rolling_switch_where_memory_holds_one_version(tmp_path: Path) -> None:
    ring = _start(tmp_path, ["a", "b", "c", "d"], 2, "--memory-budget", str(ONE_SPAN_BUDGET))
    try:
        refs = _refs()
        v1 = _digest(ring)
        export_version(ring.repo, 2, V2_SEED)
        v2 = _v2_digest(ring)
        urls = list(ring.node_urls.values())
        result = switch_under_load(ring.url, urls, IDS, refs, v1, v2, {})
        _assert_clean_switch(result, "v1", "v2")
        placement = _cluster(ring)["placements"]["demo"]
        assert [len(s["replicas"]) for s in placement["spans"]] == [2, 2], placement
        for node in _cluster(ring)["nodes"]:
            assert len(node["spans"]) == 1 and node["spans"][0]["digest"] == v2, node
    finally:
        ring.stop()


def _failing_model() -> onnx.ModelProto:
    """The demo signature, but a Reshape to [-1, 7] that fails on the warm-up input (16 ids)."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["f", "shape"], ["r"]),
            helper.make_node("Unsqueeze", ["r", "axis"], ["last_hidden_state"]),
        ],
        "fails_at_warmup",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, None)],
        [
            helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 7]),
            helper.make_tensor("axis", TensorProto.INT64, [1], [0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_version_whose_warm_up_fails_leaves_v1_serving(tmp_path: Path) -> None:
    ring = _start(tmp_path, ["a", "b"], 1)
    try:
        refs = _refs()
        v1 = _digest(ring)
        (ring.repo / "demo" / "2").mkdir()
        onnx.save(_failing_model(), ring.repo / "demo" / "2" / "model.onnx")
        urls = list(ring.node_urls.values())
        result = switch_under_load(ring.url, urls, IDS, refs, v1, "none", {}, settle_s=1.0)
        assert result.status in (400, 503), result.body
        assert "nothing was switched" in result.body["error"], result.body
        assert "node " in result.body["error"] and "warm" in result.body["error"], result.body
        assert result.count("error") == 0 and result.count("wrong") == 0, result.errors
        assert set(result.after) == {"v1"}
        assert _digest(ring) == v1
        held = [{s["digest"] for s in node["spans"]} for node in _cluster(ring)["nodes"]]
        assert set().union(*held) == {v1}, held  # v2's slots already loaded were unloaded
    finally:
        ring.stop()


def test_a_restarted_coordinator_serves_the_pinned_version_and_reads_old_placements(
    tmp_path: Path,
) -> None:
    ring = _start(tmp_path, ["a", "b"], 1)
    try:
        v1 = _digest(ring)
        export_version(ring.repo, 2, V2_SEED)
        assert ring.coordinator is not None
        ring.coordinator.terminate()
        ring.coordinator.wait(timeout=20)
        ring.start_coordinator("--replace-after-s", "0")
        ring.wait_members(2)
        ring.wait_ready()
        assert _digest(ring) == v1  # pinned: not the highest version on disk
        assert np.allclose(ring.infer("demo", IDS), reference(IDS, V1_SEED), atol=1e-4)

        # the format the first release wrote ({model: placement}: no version, no digest); it
        # served the highest version on disk, so the migration pins that one (v2 here)
        state = tmp_path / "coordinator" / "placements.json"
        pinned = json.loads(state.read_text())
        old = {"demo": pinned["models"]["demo"]["placement"]}
        ring.coordinator.terminate()
        ring.coordinator.wait(timeout=20)
        state.write_text(json.dumps(old))
        ring.start_coordinator("--replace-after-s", "0")
        ring.wait_members(2)
        ring.wait_ready()
        assert np.allclose(ring.infer("demo", IDS), reference(IDS, V2_SEED), atol=1e-4)
        migrated = json.loads(state.read_text())["models"]["demo"]
        assert migrated["version"] == 2 and migrated["digest"] == _v2_digest(ring)
    finally:
        ring.stop()
