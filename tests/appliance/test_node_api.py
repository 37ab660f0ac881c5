"""The node's KServe v2 API on a real aiohttp server (port 0) with real onnxruntime sessions."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.http.v2 import worth_compressing
from runtime.codec import decode_response, encode_request
from runtime.datatypes import V2_TO_NUMPY
from tests.conftest import RunningNode, StartNode
from tests.models import all_types_model, dense_model, put_model, sequence_model

HEADER = "Inference-Header-Content-Length"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    put_model(tmp_path, "types", all_types_model(width=3))
    put_model(tmp_path, "dense", dense_model(features=4, units=3))
    put_model(tmp_path, "seq", sequence_model(hidden=8, vocab=50))
    return tmp_path


@pytest.fixture
async def node(start_node: StartNode, repo: Path) -> RunningNode:
    return await start_node(repo)


def sample(datatype: str, rows: int, rng: np.random.Generator) -> np.ndarray:
    dtype = V2_TO_NUMPY[datatype]
    if datatype == "BYTES":
        words = [b"", b"abc", "h\u00e9llo \u2603".encode(), b"x" * 40]
        return np.array([[words[(r + c) % 4] for c in range(3)] for r in range(rows)], object)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=(rows, 3)).astype(bool)
    if dtype.kind == "f":
        return rng.normal(size=(rows, 3)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=(rows, 3), dtype=dtype, endpoint=True)


async def post_infer(
    node: RunningNode, model: str, body: bytes, header_length: int | None, **headers: str
):
    if header_length is not None:
        headers[HEADER] = str(header_length)
    return await node.client.post(f"{node.url}/v2/models/{model}/infer", data=body, headers=headers)


async def infer_ok(
    node: RunningNode, model: str, body: bytes, header_length: int | None, **headers: str
):
    async with await post_infer(node, model, body, header_length, **headers) as response:
        raw = await response.read()
        assert response.status == 200, raw
        return decode_response(raw, _header(response))


def _header(response) -> int | None:
    value = response.headers.get(HEADER)
    return int(value) if value is not None else None


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_every_datatype_round_trips(node: RunningNode, binary: bool) -> None:
    rng = np.random.default_rng(0)
    inputs = {f"in_{t}": sample(t, 2, rng) for t in V2_TO_NUMPY}
    body, length = encode_request(
        inputs,
        [f"out_{t}" for t in V2_TO_NUMPY],
        binary_inputs=binary,
        binary_outputs=binary,
        request_id="r1",
    )
    result = await infer_ok(node, "types", body, length)
    assert result.model_name == "types" and result.model_version == "1" and result.id == "r1"
    for t in V2_TO_NUMPY:
        got, want = result.outputs[f"out_{t}"], inputs[f"in_{t}"]
        assert result.datatypes[f"out_{t}"] == t
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


async def test_triton_style_request_gets_binary_outputs(node: RunningNode) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    body, length = encode_request({"x": x})  # no outputs named: binary_data_output = true
    async with await post_infer(node, "dense", body, length) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/octet-stream"
        raw = await response.read()
        header = orjson.loads(raw[: _header(response)])
        assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [24, 8]
        result = decode_response(raw, _header(response))
    assert result.outputs["y"].shape == (2, 3) and result.outputs["s"].shape == (2, 1)


async def test_json_request_gets_a_json_answer_with_requested_outputs_only(
    node: RunningNode,
) -> None:
    request = {
        "id": "7",
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]}],
        "outputs": [{"name": "s"}],
    }
    async with node.client.post(f"{node.url}/v2/models/dense/infer", json=request) as response:
        assert response.status == 200 and HEADER not in response.headers
        answer = await response.json()
    assert answer["id"] == "7" and [o["name"] for o in answer["outputs"]] == ["s"]
    assert answer["outputs"][0]["shape"] == [1, 1] and answer["outputs"][0]["datatype"] == "FP32"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_request_bodies_are_accepted(node: RunningNode, encoding: str) -> None:
    x = np.ones((3, 4), np.float32)
    body, length = encode_request({"x": x}, ["y"])
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    result = await infer_ok(node, "dense", packed, length, **{"Content-Encoding": encoding})
    direct = await infer_ok(node, "dense", body, length)
    np.testing.assert_array_equal(result.outputs["y"], direct.outputs["y"])


@pytest.mark.parametrize(
    "policy, accepted, remote, header_length, size, expected",
    [
        ("auto", "gzip, deflate", "10.0.0.7", None, 75_000, True),  # big JSON, another host
        ("auto", "gzip, deflate", "127.0.0.1", None, 75_000, False),  # loopback: CPU only
        ("auto", "gzip", "::1", None, 75_000, False),
        ("auto", "gzip", "10.0.0.7", 120, 75_000, False),  # binary tensors barely compress
        ("auto", "gzip", "10.0.0.7", None, 1_000, False),  # small
        ("auto", "br", "10.0.0.7", None, 75_000, False),  # nothing we can send
        ("always", "deflate", "127.0.0.1", 120, 10, True),
        ("never", "gzip", "10.0.0.7", None, 75_000, False),
    ],
)
def test_which_answers_are_worth_compressing(
    policy: str, accepted: str, remote: str, header_length: int | None, size: int, expected: bool
) -> None:
    assert worth_compressing(policy, accepted, remote, header_length, size) is expected


async def test_large_json_answers_to_a_local_client_are_not_compressed(node: RunningNode) -> None:
    ids = np.ones((1, 100), np.int64)  # an answer of 800 floats: several KB of JSON
    body, length = encode_request({"ids": ids}, binary_inputs=False, binary_outputs=False)
    async with await post_infer(node, "seq", body, length, **{"Accept-Encoding": "gzip"}) as r:
        assert r.status == 200 and "Content-Encoding" not in r.headers
        assert decode_response(await r.read(), _header(r)).outputs["hidden"].shape == (1, 100, 8)


async def test_compress_responses_always(start_node: StartNode, repo: Path) -> None:
    node = await start_node(repo, compress_responses="always")
    body, length = encode_request({"x": np.ones((1, 4), np.float32)}, ["y"])
    async with await post_infer(node, "dense", body, length, **{"Accept-Encoding": "deflate"}) as r:
        assert r.status == 200 and r.headers.get("Content-Encoding") == "deflate"
        assert decode_response(await r.read(), _header(r)).outputs["y"].shape == (1, 3)


async def test_concurrent_requests_of_different_batch_sizes_get_their_own_rows(
    node: RunningNode,
) -> None:
    rng = np.random.default_rng(3)
    batches = [
        rng.integers(0, 50, size=(int(n), 5)).astype(np.int64) for n in rng.integers(1, 9, size=48)
    ]

    async def one(ids: np.ndarray) -> np.ndarray:
        body, length = encode_request({"ids": ids}, ["hidden"])
        return (await infer_ok(node, "seq", body, length)).outputs["hidden"]

    results = await asyncio.gather(*(one(ids) for ids in batches))
    singles = [await one(ids[i : i + 1]) for ids in batches[:6] for i in range(len(ids))]
    flat = [row for ids, got in zip(batches[:6], results[:6], strict=True) for row in got]
    for got, want in zip(flat, singles, strict=True):
        np.testing.assert_array_equal(got, want[0])
    for ids, got in zip(batches, results, strict=True):
        assert got.shape == (len(ids), 5, 8)
    stats = await (await node.client.get(f"{node.url}/v2/models/seq/stats")).json()
    model = stats["model_stats"][0]
    assert model["execution_count"] < model["inference_count"]


async def test_server_and_model_metadata(node: RunningNode) -> None:
    server = await (await node.client.get(f"{node.url}/v2")).json()
    assert (
        "binary_tensor_data" in server["extensions"] and "model_repository" in server["extensions"]
    )
    live = await node.client.get(f"{node.url}/v2/health/live")
    assert live.status == 200 and (await live.json())["live"] is True
    meta = await (await node.client.get(f"{node.url}/v2/models/seq")).json()
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "ids", "datatype": "INT64", "shape": [-1, -1]}]
    assert meta["outputs"] == [{"name": "hidden", "datatype": "FP32", "shape": [-1, -1, 8]}]
    assert meta["parameters"]["digest"].startswith("sha256:")
    assert meta["parameters"]["warmup_runs"] == 2  # batch 1 and max_batch_size, before ready
    versioned = await node.client.get(f"{node.url}/v2/models/seq/versions/1")
    assert versioned.status == 200
    ready = await node.client.get(f"{node.url}/v2/models/seq/versions/1/ready")
    assert ready.status == 200
    config = await (await node.client.get(f"{node.url}/v2/models/seq/config")).json()
    assert config["max_batch_size"] == 32 and config["input"][0]["dims"] == [-1]
    assert config["input"][0]["data_type"] == "TYPE_INT64"


async def test_repository_index_load_and_unload(node: RunningNode) -> None:
    for body in (None, b"{}", b'{"ready": true}'):
        response = await node.client.post(f"{node.url}/v2/repository/index", data=body)
        assert response.status == 200
        rows = await response.json()
        assert {r["name"] for r in rows} == {"dense", "seq", "types"}
        assert all(r["state"] == "READY" and r["version"] == "1" for r in rows)
    unload = await node.client.post(f"{node.url}/v2/repository/models/dense/unload")
    assert unload.status == 200 and await unload.read() == b""
    gone = await node.client.get(f"{node.url}/v2/models/dense/ready")
    assert gone.status == 503
    ready = await node.client.get(f"{node.url}/v2/health/ready")
    assert ready.status == 503 and "dense" in (await ready.json())["error"]
    load = await node.client.post(f"{node.url}/v2/repository/models/dense/load")
    assert load.status == 200
    assert (await node.client.get(f"{node.url}/v2/models/dense/ready")).status == 200
    missing = await node.client.post(f"{node.url}/v2/repository/models/nope/load")
    assert missing.status == 404 and "nope" in (await missing.json())["error"]


async def test_metrics_count_requests(node: RunningNode) -> None:
    body, length = encode_request({"x": np.ones((1, 4), np.float32)})
    for _ in range(3):
        await infer_ok(node, "dense", body, length)
    await (await post_infer(node, "dense", b"{", None)).read()
    text = await (await node.client.get(f"{node.url}/metrics")).text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("appliance_requests_total", (("model", "dense"), ("status", "200")))] == 3
    assert samples[("appliance_requests_total", (("model", "dense"), ("status", "400")))] == 1
    assert (
        samples[("appliance_model_inferences_total", (("model", "dense"), ("version", "1")))] == 3
    )
    assert samples[("appliance_request_queue_seconds_count", (("model", "dense"),))] == 3
    assert samples[("appliance_request_compute_seconds_count", (("model", "dense"),))] == 3
    assert sum(v for (name, _), v in samples.items() if name == "appliance_batch_runs_total") >= 1
    assert samples[("appliance_process_cpu_seconds_total", ())] > 0
