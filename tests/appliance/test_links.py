"""Links between ring members: what a call's timing says of its link, probes when a member is
first seen, the figures in heartbeats, GET /v2/cluster and /metrics, and the node's compute
per hop beside them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from appliance.ring.links import SMALL_BYTES, LinkTable
from exporter.package_writer import write_package
from runtime.manifest import read_manifest
from tests.conftest import StartCoordinator
from tests.models import dense_reference, dense_segments


def test_small_calls_measure_latency_and_large_ones_throughput() -> None:
    table = LinkTable()
    peer = "http://10.0.0.2:8001"
    for _ in range(5):
        table.record(peer + "/internal/hop", 0.002, 1_000)
    link = table.links[peer]
    assert link.latency() == 0.002 and link.throughput() is None
    # 1 MB more took 10 ms more than the latency: 100 MB/s
    table.record(peer + "/internal/step", 0.012, 1_000_000)
    assert abs((link.throughput() or 0) - 1e8) < 1
    # a large call lost in the latency's noise says nothing of the throughput
    table.record(peer + "/internal/hop", 0.0021, SMALL_BYTES + 1)
    assert abs((link.throughput() or 0) - 1e8) < 1
    report = table.report()[0]
    assert report["to"] == peer and report["calls"] == 7
    assert report["bytes"] == 5_000 + 1_000_000 + SMALL_BYTES + 1
    assert report["latency_s"] == 0.002 and report["probe_latency_s"] is None
    # a probe's figures stand in only until traffic measures the link
    table.record_probe("http://10.0.0.3:8001", 0.0004, 5e8)
    probed = table.links["http://10.0.0.3:8001"]
    assert probed.latency() == 0.0004 and probed.throughput() == 5e8 and probed.known()


def test_the_exporter_records_what_each_segment_hands_the_next(tmp_path: Path) -> None:
    write_package(tmp_path, "dense2", 1, list(dense_segments(hidden=6, units=3)), source="test")
    segments = read_manifest(tmp_path / "dense2" / "1").segments
    assert [s.output_row_bytes for s in segments] == [6 * 4, 3 * 4]  # fp32 per row


async def test_links_are_probed_measured_by_traffic_and_shown(
    tmp_path: Path, start_coordinator: StartCoordinator
) -> None:
    repo = tmp_path / "repo"
    write_package(repo, "dense2", 1, list(dense_segments()), source="test")
    ring = await start_coordinator(repo, nodes=2)
    await ring.service.load("dense2", 2, 1)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                        "data": x.ravel().tolist()}]}  # fmt: skip
    for _ in range(20):
        async with ring.client.post(
            ring.url + "/v2/models/dense2/infer", json=body, headers={"Cache-Control": "no-cache"}
        ) as response:
            assert response.status == 200, await response.text()
            got = (await response.json())["outputs"][0]["data"]
            np.testing.assert_allclose(np.reshape(got, (2, 3)), dense_reference(x), rtol=1e-5)
    first, second = (s.replicas[0] for s in ring.service.placements["dense2"].spans)
    await asyncio.sleep(0.6)  # heartbeats after the traffic (every 0.2 s)
    async with ring.client.get(ring.url + "/v2/cluster") as response:
        links = {(r["from"], r["to"]): r for r in (await response.json())["links"]}
    # the coordinator probed both nodes when they joined
    for node in ("n0", "n1"):
        probed = links[("coordinator", node)]
        assert probed["probe_latency_ms"] is not None and probed["probe_latency_ms"] > 0
        assert probed["probe_throughput_mbit_s"] is not None
    # every request crossed coordinator -> first span -> second span; the nodes probed each
    # other on a heartbeat, and the first span's node reports its traffic to the second
    assert links[("coordinator", first)]["calls"] >= 20
    hop = links[(first, second)]
    assert hop["calls"] >= 20 and hop["latency_ms"] > 0 and hop["network_s"] > 0
    assert links[(second, first)]["probe_latency_ms"] is not None
    # the first span's node: its compute per hop and its link's network seconds in /metrics
    address = ring.service.cluster.members[first].address
    async with ring.client.get(address + "/metrics") as response:
        text = await response.text()
    compute = _value(text, 'appliance_hop_compute_seconds_count{kind="hop"}')
    assert compute is not None and compute >= 20
    second_address = ring.service.cluster.members[second].address
    network = _value(text, f'appliance_link_network_seconds_total{{peer="{second_address}"}}')
    assert network is not None and network > 0
    # the hop's answer said what it cost the node (the link's share is the rest)
    assert json.dumps(hop)  # plain JSON


def _value(metrics: str, series: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None
