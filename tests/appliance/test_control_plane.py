"""The control plane's pure choices (extra replicas for joining nodes, speed in the balancer and
in placement, pinned state across formats, load parameters) and, with real ring nodes in
process, what nodes report and refuse, default stages, and rebalancing."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from appliance.config import CoordinatorConfig, load_config
from appliance.coordinator import switch
from appliance.coordinator.placement import NodeCapacity, Placement, SpanAssignment, place
from appliance.coordinator.rebalance import SpanLoad, add_replica, busiest_span, node_busyness
from appliance.coordinator.routes import _version_parameter
from appliance.coordinator.state import (
    Pinned,
    parse_placements,
    restore_placements,
    save_placements,
)
from appliance.errors import BadRequest, ConfigError, DoesNotFit
from appliance.node.keys import REGISTRY
from appliance.node.membership import member_status
from appliance.ring.balancer import ReplicaStats, pick, score
from exporter.package_writer import write_package
from runtime.calibration import calibration_graph, measure_speed
from runtime.manifest import read_manifest
from runtime.memory import span_need
from runtime.session import SessionSettings
from tests.conftest import StartCoordinator
from tests.models import dense_segments

MIB = 2**20


# -- joining nodes get work (pure) ----------------------------------------------------------


def test_the_busiest_span_per_replica_that_fits_is_chosen() -> None:
    spans = [
        SpanLoad("m", 0, 3, 10 * MIB, ("a", "b")),  # 12 queued over two replicas: 6 each
        SpanLoad("m", 4, 7, 10 * MIB, ("c",)),  # 8 on one
        SpanLoad("big", 0, 0, 4096 * MIB, ("d",)),  # 50 queued, but too big for the newcomer
    ]
    busy = {"a": 6.0, "b": 6.0, "c": 8.0, "d": 50.0}
    chosen = busiest_span(spans, busy, "new", free_bytes=1024 * MIB)
    assert chosen is not None and (chosen.model, chosen.first) == ("m", 4)
    assert busiest_span(spans, busy, "c", free_bytes=1024 * MIB) == spans[0]  # c holds 4-7
    assert busiest_span(spans, busy, "new", free_bytes=span_need(10 * MIB) - 1) is None


def test_idle_spans_tie_to_the_one_with_fewer_replicas_then_the_heavier() -> None:
    spans = [
        SpanLoad("m", 0, 0, 1 * MIB, ("a", "b")),
        SpanLoad("m", 1, 1, 2 * MIB, ("c",)),
        SpanLoad("m", 2, 2, 3 * MIB, ("d",)),
    ]
    chosen = busiest_span(spans, {}, "new", free_bytes=1 << 40)
    assert chosen == spans[2]


def test_busyness_counts_queued_running_and_sequences() -> None:
    assert node_busyness({"queue_depth": 3, "in_flight": 2, "sequences": 1, "rss": 9e9}) == 6
    assert node_busyness({}) == 0


def test_an_extra_replica_bumps_the_placement_counter() -> None:
    placement = Placement(
        3, (SpanAssignment(0, 0, 1, 10, ("a",)), SpanAssignment(1, 2, 2, 5, ("b",)))
    )
    grown = add_replica(placement, SpanLoad("m", 2, 2, 5, ("b",)), "c")
    assert grown.version == 4 and [s.replicas for s in grown.spans] == [("a",), ("b", "c")]


def test_grow_replicas_adds_distinct_nodes_within_budgets() -> None:
    need = span_need(10)
    placement = Placement(
        1, (SpanAssignment(0, 0, 0, 10, ("a",)), SpanAssignment(1, 1, 1, 10, ("b",)))
    )
    nodes = [NodeCapacity("c", need, 1.0, 2), NodeCapacity("d", 2 * need, 1.0, 3)]
    grown = switch.grow_replicas(placement, nodes, 1, 2)
    # the freest first: d takes span 0, then c and d are as free, and c (listed first) span 1
    assert [s.replicas for s in grown.spans] == [("a", "d"), ("b", "c")]
    assert grown.version == 2
    crowded = switch.grow_replicas(placement, [NodeCapacity("c", need - 1, 1.0, 2)], 1, 2)
    assert [s.replicas for s in crowded.spans] == [("a",), ("b",)]  # nothing fits: as it was


# -- speed --------------------------------------------------------------------------------


def test_the_heavier_span_goes_to_the_faster_node() -> None:
    gib = 2**30
    for sizes in ([3 * gib, 1 * gib], [1 * gib, 3 * gib]):
        nodes = [NodeCapacity("slow", 8 * gib, 1.0, 0), NodeCapacity("fast", 8 * gib, 3.0, 1)]
        placement = place(sizes, nodes, 1, 2)
        heavy = max(placement.spans, key=lambda s: s.bytes)
        assert heavy.replicas == ("fast",), placement.as_dict()
        # the same ring with equal speeds: no reason to prefer "fast" for the heavy span
        nodes = [NodeCapacity("slow", 8 * gib, 3.0, 0), NodeCapacity("fast", 8 * gib, 1.0, 1)]
        heavy = max(place(sizes, nodes, 1, 2).spans, key=lambda s: s.bytes)
        assert heavy.replicas == ("slow",)


def test_a_faster_replica_without_samples_takes_more_of_the_first_traffic() -> None:
    fast, slow = ReplicaStats("fast", speed=2.0), ReplicaStats("slow", speed=1.0)
    assert score(fast, 0.01) == pytest.approx(0.005) and score(slow, 0.01) == pytest.approx(0.01)
    rng = random.Random(0)
    picks = [pick([fast, slow], rng).key for _ in range(200)]  # type: ignore[union-attr]
    assert picks.count("fast") == 200  # two candidates: p2c compares both, every time
    sampled = ReplicaStats("fast", ewma_latency_s=0.05, samples=3, speed=2.0)
    assert score(sampled, 0.01) == pytest.approx(0.05)  # measured latency wins once known
    assert score(ReplicaStats("odd", speed=float("nan")), 0.01) == pytest.approx(0.01)


def test_the_calibration_graph_is_the_same_everywhere_and_measures() -> None:
    assert calibration_graph() == calibration_graph()
    measured = measure_speed(SessionSettings(device="cpu", intra_op_threads=1), runs=5)
    assert measured.device == "cpu" and measured.gflops > 0 and measured.median_run_s > 0


# -- pinned state and load parameters -----------------------------------------------------


def _placement() -> Placement:
    return Placement(2, (SpanAssignment(0, 0, 1, 100, ("a", "b")),))


def test_pinned_state_round_trips_and_format_one_is_read(tmp_path: Path) -> None:
    save_placements(tmp_path, {"m": Pinned(3, "sha256:ab", _placement())})
    assert restore_placements(tmp_path) == {"m": Pinned(3, "sha256:ab", _placement())}
    doc = json.loads((tmp_path / "placements.json").read_text())
    assert doc["format"] == 2 and doc["models"]["m"]["version"] == 3
    format_one = {"m": _placement().as_dict()}  # what the first release wrote
    assert parse_placements(format_one) == {"m": Pinned(None, None, _placement())}
    (tmp_path / "placements.json").write_text("{not json")
    assert restore_placements(tmp_path) == {}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("2", 2), (3, 3), ("10", 10)])
def test_a_version_may_be_named_as_triton_clients_do(value: object, expected: int | None) -> None:
    assert _version_parameter(value) == expected


@pytest.mark.parametrize("value", ["one", "0", 0, -1, True, 1.5, "", [1]])
def test_a_version_that_is_no_version_number_is_400(value: object) -> None:
    with pytest.raises(BadRequest, match="version must be a version number"):
        _version_parameter(value)


def test_rebalance_accepts_manual_and_replicas_only(tmp_path: Path) -> None:
    config = load_config(CoordinatorConfig, None, {"rebalance": "replicas"})
    assert config.rebalance == "replicas"
    with pytest.raises(ConfigError, match="rebalance"):
        load_config(CoordinatorConfig, None, {"rebalance": "always"})


# -- with real nodes ----------------------------------------------------------------------


def two_span_repo(repo: Path, default_stages: list[list[int]] | None = None) -> Path:
    write_package(repo, "dense2", 1, list(dense_segments()), source="test",
                  default_stages=default_stages)  # fmt: skip
    return repo


async def test_nodes_report_bytes_memory_and_speed(
    tmp_path: Path, start_coordinator: StartCoordinator
) -> None:
    ring = await start_coordinator(two_span_repo(tmp_path / "repo"), nodes=2)
    await ring.service.load("dense2", 2, 1)
    await asyncio.sleep(0.5)  # a heartbeat after the load
    for member in ring.service.cluster.members.values():
        assert member.load["memory_available"] > 0 and member.load["speed"] > 0
        assert [s.bytes for s in member.spans] and all(s.bytes > 0 for s in member.spans)
    assert set(ring.service.hops.speeds.values()) and all(
        v > 0 for v in ring.service.hops.speeds.values()
    )


async def test_a_node_refuses_a_load_beyond_its_budget_whatever_the_coordinator_thinks(
    tmp_path: Path, start_coordinator: StartCoordinator
) -> None:
    repo = two_span_repo(tmp_path / "repo")
    sizes = [s.bytes for s in read_manifest(repo / "dense2" / "1").segments]
    budget = span_need(max(sizes)) + MIB  # one span, not two
    ring = await start_coordinator(repo, nodes=1, node_settings={"memory_budget": budget})
    member = next(iter(ring.service.cluster.members.values()))
    entry = ring.service.entry("dense2")
    await switch.load_span(ring.service, member, entry, 0, 0)
    with pytest.raises(DoesNotFit, match="memory budget is .* MiB; its spans take"):
        await switch.load_span(ring.service, member, entry, 1, 1)  # a stale view asking more


async def test_unloading_a_model_frees_its_spans_on_every_node(
    tmp_path: Path, start_coordinator: StartCoordinator
) -> None:
    ring = await start_coordinator(two_span_repo(tmp_path / "repo"), nodes=2)
    await ring.service.load("dense2", 2, 1)
    assert all(node.app[REGISTRY].loaded() for node in ring.nodes)
    await ring.service.unload("dense2")
    assert not any(node.app[REGISTRY].loaded() for node in ring.nodes)  # memory given back
    await asyncio.sleep(0.5)  # heartbeats after the unload
    assert not any(m.spans for m in ring.service.cluster.members.values())


async def test_a_heartbeat_built_before_an_unload_does_not_bring_the_span_back(
    tmp_path: Path, start_coordinator: StartCoordinator
) -> None:
    # the race that failed a rolling switch in CI: a heartbeat the node built before the
    # unload lands while the unload is on its way, and replaces the member record
    ring = await start_coordinator(
        two_span_repo(tmp_path / "repo"), nodes=1, node_timeout_s=120,
        node_settings={"heartbeat_interval_s": 60},  # only the heartbeat the test sends
    )  # fmt: skip
    c = ring.service
    await c.load("dense2", 1, 1)
    node, member = ring.nodes[0], next(iter(c.cluster.members.values()))
    await asyncio.sleep(0)
    stale = member_status(node.app)  # holds the span, at the generation before the unload
    assert stale["spans"] and stale["generation"] == member.generation
    unload = asyncio.create_task(switch.unload_span(c, member, "dense2", 0, 1, None))
    await asyncio.sleep(0)  # the unload request is on its way
    c.cluster.heartbeat(stale, asyncio.get_running_loop().time())
    await unload
    assert not node.app[REGISTRY].loaded()  # the node let it go (every version: no digest)
    current = c.cluster.members[member.node_id]
    assert current is not member and not current.spans, current.spans
    c.cluster.heartbeat(stale, asyncio.get_running_loop().time())  # arriving even later
    assert not c.cluster.members[member.node_id].spans
    assert switch.capacities(c, [c.cluster.members[member.node_id]])[0].memory_budget > 0


async def test_default_stages_are_used_unless_the_load_names_stages(
    tmp_path: Path, start_coordinator: StartCoordinator
) -> None:
    ring = await start_coordinator(two_span_repo(tmp_path / "repo", [[0, 0], [1, 1]]), nodes=2)
    placement = await ring.service.load("dense2")
    assert len(placement.spans) == 2  # the package's default_stages
    placement = await ring.service.load("dense2", stages=1, replicas=2)
    assert len(placement.spans) == 1 and len(placement.spans[0].replicas) == 2


async def test_a_node_not_in_any_placement_becomes_a_replica_of_the_busiest_span(
    tmp_path: Path, start_coordinator: StartCoordinator
) -> None:
    ring = await start_coordinator(two_span_repo(tmp_path / "repo"), nodes=2, rebalance="replicas")
    await ring.service.load("dense2", 1, 1)
    loop = asyncio.get_running_loop()
    end = loop.time() + 15
    while loop.time() < end:
        replicas = ring.service.placements["dense2"].spans[0].replicas
        if len(replicas) == 2:
            break
        await asyncio.sleep(0.1)
    assert sorted(ring.service.placements["dense2"].spans[0].replicas) == ["n0", "n1"]
    for member in ring.service.cluster.members.values():
        assert member.holds("dense2", ring.service.entry("dense2").digest, 0, 1)


@pytest.mark.parametrize(
    ("asked", "exported", "configured", "current", "segments", "expected"),
    [
        (3, 2, 2, 2, 8, 3),  # the load's own wins
        (None, 2, 4, 3, 8, 2),  # then the package's default_stages
        (None, 0, 4, 3, 8, 4),  # then the coordinator's setting
        (None, 0, 0, 3, 8, 3),  # then the model's current shape
        (None, 1, 0, 3, 8, 3),  # (an export without --stages records one stage: no choice)
        (None, 0, 0, 0, 8, None),  # else the fewest that fit
        (None, 0, 2, 0, 1, 1),  # a one-segment model takes one span, whatever is configured
        (None, 0, 0, 2, 1, 1),  # ... or was placed before
        (5, 0, 0, 0, 1, 5),  # the load's own is not cut: place() refuses it with a 400
    ],
)
def test_the_stages_of_a_load(
    asked: int | None, exported: int, configured: int, current: int, segments: int,
    expected: int | None,
) -> None:  # fmt: skip
    assert switch.choose_stages(asked, exported, configured, current, segments) == expected


async def test_no_room_for_two_versions_is_507_unless_downtime_is_allowed(
    tmp_path: Path, start_coordinator: StartCoordinator
) -> None:
    repo = two_span_repo(tmp_path / "repo")
    sizes = [s.bytes for s in read_manifest(repo / "dense2" / "1").segments]
    budget = span_need(sum(sizes)) + MIB  # the whole model once, not twice
    ring = await start_coordinator(repo, nodes=1, node_settings={"memory_budget": budget})
    await ring.service.load("dense2", 1, 1)
    write_package(repo, "dense2", 2, list(dense_segments(seed=1)), source="test")
    url = ring.url + "/v2/repository/models/dense2/load"
    async with ring.client.post(url, json={}) as response:
        assert response.status == 507
        message = (await response.json())["error"]
    assert "next to v1, which serves" in message and "allow_downtime" in message
    assert ring.service.models["dense2"].version == "1"  # still serving
    async with ring.client.post(url, json={"parameters": {"allow_downtime": True}}) as response:
        assert response.status == 200, await response.text()
    assert ring.service.models["dense2"].version == "2"
    member = next(iter(ring.service.cluster.members.values()))
    assert {s.digest for s in member.spans} == {ring.service.models["dense2"].digest}
