"""Members of one process call each other's ring routes as functions (``appliance serve
--in-process-node``): the same answers as over HTTP, errors included, with no HTTP hop."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import orjson
import pytest
import tritonclient.http.aio as triton_http
from prometheus_client.parser import text_string_to_metric_families

from appliance.ring import protocol as rp
from exporter.package_writer import write_package
from runtime.codec import decode_response, encode_request
from runtime.deadline import Deadline
from tests.conftest import RunningCoordinator, StartCoordinator
from tests.models import dense_reference, dense_segments


async def in_process_calls(ring: RunningCoordinator) -> float:
    async with ring.client.get(ring.url + "/metrics") as response:
        text = await response.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "appliance_in_process_calls_total"
    )


def two_span_repo(repo: Path) -> Path:
    write_package(repo, "dense2", 1, list(dense_segments()), source="test")
    return repo


async def test_a_ring_in_one_process_answers_as_over_http_with_no_hop_over_it(
    tmp_path: Path, start_coordinator: StartCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.access")
    ring = await start_coordinator(two_span_repo(tmp_path / "repo"), nodes=2, in_process=True,
                                   access_log=True)  # fmt: skip
    await ring.service.load("dense2", 2, 1)
    client = triton_http.InferenceServerClient(ring.url.removeprefix("http://"))
    try:
        for rows in (1, 3, 8):
            x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
            request = triton_http.InferInput("x", [rows, 4], "FP32")
            request.set_data_from_numpy(x, binary_data=True)
            result = await client.infer("dense2", [request], headers={"Cache-Control": "no-cache"})
            np.testing.assert_allclose(result.as_numpy("y"), dense_reference(x), rtol=1e-5)
    finally:
        await client.close()
    # each request: the coordinator's call of span 0, span 0's call of span 1, none over HTTP
    assert await in_process_calls(ring) == 6
    lines = [r.getMessage() for r in caplog.records if r.name == "appliance.access"]
    assert sum("/v2/models/dense2/infer" in line for line in lines) == 3, lines
    assert not [line for line in lines if "/internal/hop" in line], lines


async def test_a_local_call_fails_with_the_status_and_message_of_the_http_call(
    tmp_path: Path, start_coordinator: StartCoordinator
) -> None:
    """The coordinator's in-process post and its HTTP post (signed, over loopback) to the same
    node: a stale digest (409), a body that is not a v2 request (400), a good hop (200)."""
    ring = await start_coordinator(two_span_repo(tmp_path / "repo"), nodes=2, in_process=True)
    await ring.service.load("dense2", 1, 1)
    clients = ring.service.clients
    placement = ring.service.placements["dense2"]
    node = ring.service.cluster.members[placement.spans[0].replicas[0]].address
    digest = ring.service.models["dense2"].digest
    x = np.ones((2, 4), np.float32)
    body, length = encode_request({"x": x})
    step = rp.RouteStep(0, 1, (node,))

    def headers(digest: str, length: int | None) -> dict[str, str]:
        return rp.hop_headers("dense2", digest, step, "t", Deadline.after(10), [], length)

    cases = [(digest, body, length), ("sha256:" + "0" * 64, body, length),
             (digest, b"not a request", None)]  # fmt: skip
    for case_digest, case_body, case_length in cases:
        local = await clients.hop(node + "/internal/hop", headers(case_digest, case_length),
                                  case_body, 10)  # fmt: skip
        remote = await clients.raw_hop(node + "/internal/hop", headers(case_digest, case_length),
                                       case_body, 10)  # fmt: skip
        assert local.status == remote.status, (local, remote)
        if local.status != 200:
            assert orjson.loads(local.body) == orjson.loads(remote.body)
        else:
            got = decode_response(local.body, int(local.headers[rp.HEADER_LENGTH.lower()]))
            np.testing.assert_allclose(got.outputs["y"], dense_reference(x), rtol=1e-5)
            assert local.body == remote.body
    assert await in_process_calls(ring) == len(cases)
