"""Bad input gets a clear 4xx (or 503) with a message, and the server keeps serving."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

import numpy as np
import orjson
import pytest

from runtime.codec import decode_response, encode_request
from tests.conftest import RunningNode, StartNode
from tests.models import dense_model, fixed_batch_model, put_model, sequence_model

HEADER = "Inference-Header-Content-Length"
GOOD = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    put_model(tmp_path, "dense", dense_model(features=4, units=3))
    put_model(tmp_path, "fixed", fixed_batch_model())
    put_model(tmp_path, "seq", sequence_model(vocab=10))
    return tmp_path


@pytest.fixture
async def node(start_node: StartNode, repo: Path) -> RunningNode:
    return await start_node(repo, max_body_bytes=64 * 1024, max_tensor_elements=4096)


async def expect_error(
    node: RunningNode, status: int, fragment: str, body: bytes, model: str = "dense", **headers: str
) -> dict:
    url = f"{node.url}/v2/models/{model}/infer"
    async with node.client.post(url, data=body, headers=headers) as response:
        raw = await response.read()
        assert response.status == status, raw
        assert response.headers["Content-Type"].startswith("application/json")
        error = orjson.loads(raw)["error"]
        assert fragment.lower() in error.lower(), error
    # ... and the server keeps serving
    async with node.client.post(f"{node.url}/v2/models/dense/infer", json=GOOD) as response:
        assert response.status == 200
    return {"error": error}


def with_input(**changes: object) -> bytes:
    tensor = {**GOOD["inputs"][0], **changes}
    return orjson.dumps({"inputs": [tensor]})


async def test_malformed_json(node: RunningNode) -> None:
    await expect_error(node, 400, "json", b'{"inputs": [')


async def test_body_that_is_not_an_object(node: RunningNode) -> None:
    await expect_error(node, 400, "object", b"[1, 2, 3]")


async def test_unknown_model_is_404_and_names_the_models(node: RunningNode) -> None:
    await expect_error(node, 404, "dense", orjson.dumps(GOOD), model="nope")
    async with node.client.get(f"{node.url}/v2/models/nope") as response:
        assert response.status == 404
    async with node.client.get(f"{node.url}/v2/models/dense/versions/9") as response:
        assert response.status == 404 and "loaded: 1" in (await response.json())["error"]


async def test_unknown_input_names_the_signature(node: RunningNode) -> None:
    await expect_error(node, 400, "x: FP32[?,4]", with_input(name="z"))


async def test_missing_input(node: RunningNode) -> None:
    await expect_error(node, 400, "inputs", orjson.dumps({"inputs": []}))


async def test_unknown_output(node: RunningNode) -> None:
    body = orjson.dumps({**GOOD, "outputs": [{"name": "nope"}]})
    await expect_error(node, 400, "unknown output", body)


async def test_wrong_datatype(node: RunningNode) -> None:
    await expect_error(node, 400, "FP32", with_input(datatype="INT32"))
    await expect_error(node, 400, "datatype", with_input(datatype="FLOAT"))


async def test_shape_that_does_not_match_the_data_length(node: RunningNode) -> None:
    await expect_error(node, 400, "shape", with_input(shape=[2, 4]))


async def test_shape_that_breaks_a_fixed_dim(node: RunningNode) -> None:
    await expect_error(node, 400, "fixes it to 4", with_input(shape=[2, 2]))
    bad_rank = {"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    await expect_error(node, 400, "rank", orjson.dumps(bad_rank))


async def test_corrupt_gzip_body(node: RunningNode) -> None:
    broken = gzip.compress(orjson.dumps(GOOD))[:-12]
    await expect_error(node, 400, "gzip", broken, **{"Content-Encoding": "gzip"})
    await expect_error(node, 400, "gzip", b"not gzip at all", **{"Content-Encoding": "gzip"})
    await expect_error(node, 415, "accepted", orjson.dumps(GOOD), **{"Content-Encoding": "br"})


async def test_header_length_larger_than_the_body_or_not_a_number(node: RunningNode) -> None:
    body, length = encode_request({"x": np.ones((1, 4), np.float32)})
    assert length is not None
    await expect_error(node, 400, "header", body, **{HEADER: str(len(body) + 1)})
    await expect_error(node, 400, "header", body, **{HEADER: "abc"})
    await expect_error(node, 400, "header", body, **{HEADER: "-5"})


async def test_binary_sizes_that_do_not_add_up(node: RunningNode) -> None:
    body, length = encode_request({"x": np.ones((1, 4), np.float32)})
    assert length is not None
    await expect_error(node, 400, "binary", body[:-4], **{HEADER: str(length)})
    await expect_error(node, 400, "binary", body + b"\0\0\0\0", **{HEADER: str(length)})


async def test_body_over_the_limit_is_413_also_once_decompressed(node: RunningNode) -> None:
    big = np.zeros((20_000, 4), np.float32)  # 320 KB of binary data > 64 KB
    body, length = encode_request({"x": big})
    await expect_error(node, 413, "limit", body, **{HEADER: str(length)})
    bomb = gzip.compress(body)  # compresses to a few hundred bytes
    assert len(bomb) < 64 * 1024
    await expect_error(
        node, 413, "decompressed", bomb, **{HEADER: str(length), "Content-Encoding": "gzip"}
    )


async def test_a_tensor_over_max_tensor_elements_is_413_before_any_allocation(
    node: RunningNode,
) -> None:
    body, length = encode_request({"x": np.ones((1025, 4), np.float32)})  # 4100 > 4096
    assert len(body) < 64 * 1024  # under the body limit: the element limit answers
    error = await expect_error(node, 413, "max_tensor_elements", body, **{HEADER: str(length)})
    assert "4100 elements" in error["error"] and "4,096" in error["error"]
    # a declared shape of 10^12 elements with almost no body is refused the same way
    huge = with_input(shape=[1_000_000, 1_000_000], data=[1.0])
    await expect_error(node, 413, "max_tensor_elements", huge)


async def test_bad_timeout_parameter_and_token_out_of_range(node: RunningNode) -> None:
    body = orjson.dumps({**GOOD, "parameters": {"timeout": "soon"}})
    await expect_error(node, 400, "timeout", body)
    ids = {"inputs": [{"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 99]}]}
    await expect_error(node, 400, "could not run", orjson.dumps(ids), model="seq")


async def test_unknown_route_and_method_get_json_errors(node: RunningNode) -> None:
    async with node.client.get(f"{node.url}/v3/nothing") as response:
        assert response.status == 404 and "error" in await response.json()
    async with node.client.get(f"{node.url}/v2/models/dense/infer") as response:
        assert response.status == 405 and "error" in await response.json()


async def test_model_without_batch_dim_is_served_unbatched(node: RunningNode) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    body, length = encode_request({"x": x})
    async with node.client.post(
        f"{node.url}/v2/models/fixed/infer", data=body, headers={HEADER: str(length)}
    ) as response:
        assert response.status == 200
        result = decode_response(await response.read(), int(response.headers[HEADER]))
    np.testing.assert_array_equal(result.outputs["y"], x * 3)
    config = await (await node.client.get(f"{node.url}/v2/models/fixed/config")).json()
    assert config["max_batch_size"] == 0 and config["input"][0]["dims"] == [2, 3]


async def test_full_queue_is_503_with_retry_after(start_node: StartNode, tmp_path: Path) -> None:
    put_model(tmp_path, "wide", dense_model(features=1500, units=1500))
    node = await start_node(tmp_path, max_batch_size=1, max_queue_size=2)
    body, length = encode_request({"x": np.ones((64, 1500), np.float32)})

    async def one() -> tuple[int, str | None, bytes]:
        async with node.client.post(
            f"{node.url}/v2/models/wide/infer", data=body, headers={HEADER: str(length)}
        ) as response:
            return response.status, response.headers.get("Retry-After"), await response.read()

    results = await asyncio.gather(*(one() for _ in range(24)))
    statuses = [status for status, _, _ in results]
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}
    refused = next(r for r in results if r[0] == 503)
    assert refused[1] is not None and "retry later" in orjson.loads(refused[2])["error"]
    assert (await one())[0] == 200


async def test_a_model_whose_warmup_fails_is_never_ready(
    start_node: StartNode, tmp_path: Path
) -> None:
    from onnx import TensorProto, helper

    # Reshape of a 6-element constant to the shape given as input: zeros cannot be a shape.
    const = helper.make_tensor("c", TensorProto.FLOAT, [6], [1, 2, 3, 4, 5, 6])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["c", "shape"], ["y"])],
        "g",
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
        [const],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    put_model(tmp_path, "picky", model)
    node = await start_node(tmp_path, wait=False)
    for _ in range(200):
        rows = await (await node.client.post(f"{node.url}/v2/repository/index")).json()
        if "warm-up" in rows[0]["reason"]:
            break
        await asyncio.sleep(0.02)
    assert rows[0]["state"] == "UNAVAILABLE" and "warm-up" in rows[0]["reason"]
    assert (await node.client.get(f"{node.url}/v2/health/ready")).status == 503
    assert (await node.client.get(f"{node.url}/v2/models/picky/ready")).status == 503
