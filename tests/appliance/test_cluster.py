"""Membership and routes over plain data (no network)."""

from __future__ import annotations

import pytest

from appliance.coordinator.cluster import Cluster, HeldSpan
from appliance.coordinator.placement import Placement, SpanAssignment
from appliance.errors import BadRequest, MemberConflict, NoLiveReplica, NotMember


def node(
    node_id: str, spans: list[tuple[int, int]], digest: str = "d1", incarnation: str = "i1"
) -> dict:
    return {
        "node_id": node_id,
        "incarnation": incarnation,
        "address": f"http://{node_id}:9100",
        "memory_budget": 10**9,
        "device": "cpu",
        "spans": [
            {"model": "m", "version": "1", "digest": digest, "first": a, "last": b}
            for a, b in spans
        ],
    }


def test_join_heartbeat_and_silence() -> None:
    cluster = Cluster(node_timeout_s=3)
    cluster.join(node("a", []), now=0)
    cluster.join(node("b", []), now=0)
    assert [m.node_id for m in cluster.live(1)] == ["a", "b"]
    cluster.heartbeat(node("a", [(0, 1)]), now=2.5)
    assert [m.node_id for m in cluster.live(4)] == ["a"]  # b silent for more than 3 s
    with pytest.raises(NotMember, match="join again"):
        cluster.heartbeat(node("c", []), now=5)
    with pytest.raises(NotMember):
        cluster.heartbeat(node("a", [], incarnation="other"), now=5)
    with pytest.raises(BadRequest, match="node_id"):
        cluster.join({"address": "x"}, now=5)


def test_a_second_live_node_with_the_same_id_is_refused_a_restarted_one_replaces() -> None:
    cluster = Cluster()
    cluster.join(node("a", [(0, 1)]), now=0)
    with pytest.raises(MemberConflict, match="already live"):
        cluster.join(node("a", [], incarnation="i2"), now=1, old_is_alive=True)
    member = cluster.join(node("a", [], incarnation="i2"), now=1, old_is_alive=False)
    assert member.incarnation == "i2" and member.ring_index == 0 and member.spans == []


def test_route_follows_the_placement_and_skips_dead_and_other_bytes() -> None:
    cluster = Cluster(node_timeout_s=3)
    cluster.join(node("a", [(0, 1)]), now=0)
    cluster.join(node("b", [(0, 1)], digest="other"), now=0)  # another version
    cluster.join(node("c", [(2, 3)]), now=0)
    cluster.join(node("d", [(2, 3)]), now=0)
    placement = Placement(
        1, (SpanAssignment(0, 0, 1, 10, ("a", "b")), SpanAssignment(1, 2, 3, 10, ("d", "c")))
    )
    route = cluster.route("m", "d1", 4, placement, now=1)
    assert [(s.first, s.last) for s in route] == [(0, 1), (2, 3)]
    assert route[0].replicas == ("http://a:9100",)  # b holds other bytes: never routed
    assert route[1].replicas == ("http://d:9100", "http://c:9100")  # placement order
    cluster.heartbeat(node("a", [(0, 1)]), now=3.5)
    cluster.heartbeat(node("c", [(2, 3)]), now=3.5)
    assert cluster.route("m", "d1", 4, placement, now=4)[1].replicas == ("http://c:9100",)
    # all holders silent: they are still tried (a lagging heartbeat is not a dead node)
    assert cluster.route("m", "d1", 4, placement, now=7)[0].replicas == ("http://a:9100",)
    with pytest.raises(NoLiveReplica, match="segments 0-1"):
        cluster.route("m", "d1", 4, placement, now=7, exclude=frozenset({"http://a:9100"}))


def test_without_a_placement_the_route_is_read_from_what_nodes_hold() -> None:
    cluster = Cluster()
    cluster.join(node("a", [(0, 2)]), now=0)
    cluster.join(node("b", [(3, 5)]), now=0)
    route = cluster.route("m", "d1", 6, None, now=1)
    assert [(s.first, s.last, s.replicas) for s in route] == [
        (0, 2, ("http://a:9100",)),
        (3, 5, ("http://b:9100",)),
    ]
    with pytest.raises(NoLiveReplica, match="from segment 6"):
        cluster.route("m", "d1", 7, None, now=1)


def test_a_heartbeat_built_before_a_load_does_not_erase_the_span_it_loaded() -> None:
    cluster = Cluster()
    cluster.join({**node("a", []), "generation": 0}, now=0)
    member = cluster.members["a"]
    member.spans.append(HeldSpan("m", "1", "d1", 0, 1))  # the load answered: generation 1
    member.generation = 1
    cluster.heartbeat({**node("a", []), "generation": 0}, now=1)  # sent before the load
    assert cluster.members["a"].holds("m", "d1", 0, 1)
    cluster.heartbeat({**node("a", []), "generation": 2}, now=2)  # an unload since
    assert not cluster.members["a"].holds("m", "d1", 0, 1)


def test_a_node_that_left_is_out_of_routes_and_its_gone_clock_starts_at_the_leave() -> None:
    cluster = Cluster(node_timeout_s=3.0)
    member = cluster.join(node("a", [(0, 1)]), now=10.0)
    assert cluster.gone_since("a", 11.0, default=0.0) is None  # live
    cluster.leave(member, 12.0)
    assert not cluster.is_live(member, 12.5)
    assert cluster.gone_since("a", 13.0, default=0.0) == 12.0  # not "since forever"
    with pytest.raises(NoLiveReplica):  # a node that left is not "worth a try" as a silent one
        cluster.route("m", "d1", 2, None, 12.5)
    cluster.heartbeat(node("a", [(0, 1)]), now=12.6)  # one in flight as it left
    assert not cluster.is_live(cluster.members["a"], 12.7)
    assert cluster.gone_since("never-seen", 13.0, default=5.0) == 5.0
    silent = cluster.join(node("b", []), now=20.0)
    assert cluster.gone_since("b", 30.0, default=0.0) == silent.last_seen == 20.0
