"""Network faults on a ring of test hosts (network namespaces with their own addresses, TLS,
signed hops): a coordinator and 4 nodes, 2 spans x 2 replicas, under a load of 8 clients on a
host of their own. Each test prints its figures (pytest -s shows them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.hosts import HEARTBEAT_S, hosts_ring, require_hosts
from tests.support.hosts_clock import clock_offset_env
from tests.support.hosts_faults import (
    NODES,
    Figures,
    coordinator_partitioned,
    link_pulled,
    loss_on_link,
    next_span_unreachable,
    rejoined_from_new_address,
    skewed_clocks,
)

pytestmark = pytest.mark.slow


def report(name: str, figures: Figures) -> None:
    print(f"\n{name}: " + json.dumps({"sent": figures.sent, "failed": figures.failed,
          "statuses": figures.statuses, "seconds": figures.seconds,
          "details": figures.details}, default=str))  # fmt: skip


def assert_served(figures: Figures) -> None:
    assert figures.sent > 0
    assert figures.failed == 0, (figures.statuses, figures.errors)


def test_a_pulled_link_and_lost_packets_fail_no_request(tmp_path: Path) -> None:
    require_hosts(need_nft=True)
    with hosts_ring(tmp_path, NODES, stages=2, replicas=2) as ring:
        pulled = link_pulled(ring)
        report("link pulled", pulled)
        assert_served(pulled)
        assert pulled.details["answered_during_pull"] > 0  # the other replica took the load
        # hops past their replica's p99 are hedged to the other: no answer waits for the
        # pulled node's attempt timeout (min_attempt_s, 1 s)
        assert pulled.seconds["slowest_during_pull"] <= 1.0, pulled.seconds
        lossy = loss_on_link(ring, percent=5)
        report("5% loss on one link", lossy)
        assert_served(lossy)
        assert lossy.details["dropped_packets"] > 0  # the loss was real
        assert lossy.details["clean_failed"] == 0


def test_a_node_that_cannot_reach_the_next_span_fails_no_request(tmp_path: Path) -> None:
    require_hosts(need_nft=True)
    with hosts_ring(tmp_path, NODES, stages=2, replicas=2) as ring:
        figures = next_span_unreachable(ring)
        report("one-way partition to the next span", figures)
        assert all(figures.details["healthy"].values())  # it still heartbeats: no one left
        assert figures.details["dropped_packets"] > 0  # it did try the unreachable replica
        assert_served(figures)


def test_a_partitioned_coordinator_serves_again_soon_after_the_heal(tmp_path: Path) -> None:
    require_hosts(need_nft=True)
    with hosts_ring(tmp_path, NODES, stages=2, replicas=2) as ring:
        figures = coordinator_partitioned(ring)
        report("coordinator partitioned from every node", figures)
        # the partition took: a request meanwhile gets no answer from the ring (its nodes are
        # out of reach), and readiness says so (a Service stops sending it clients)
        assert figures.details["request_while_partitioned"][0] != 200
        assert figures.details["ready_status_while_partitioned"] == 503
        assert figures.details["dropped_packets"] > 0
        assert figures.details["spans_kept"] and figures.details["placement_kept"]
        assert_served(figures)
        assert figures.seconds["served_after_heal"] <= 2 * HEARTBEAT_S + 1.0, figures.seconds
        # ready again once every span has a heartbeat: nodes back off theirs while cut off
        assert 0 <= figures.seconds["ready_after_heal"] <= 5.0, figures.seconds


def test_a_node_moved_to_a_new_address_is_routed_there(tmp_path: Path) -> None:
    require_hosts()
    with hosts_ring(tmp_path, NODES, stages=2, replicas=2) as ring:
        figures = rejoined_from_new_address(ring)
        report("node rejoined from a new address", figures)
        assert figures.details["address_seen"] == f"https://{figures.details['new']}:9100"
        assert_served(figures)  # with its partner cut off, every request crossed it


def test_nodes_with_clocks_3_s_off_sign_and_meet_deadlines(tmp_path: Path) -> None:
    require_hosts()
    ahead, behind = clock_offset_env(3), clock_offset_env(-3)
    if not ahead:
        pytest.skip("no C compiler to build the clock shim (tests/support/hosts_clock.py)")
    # every node off, two ahead and two behind: whatever the placement, each hop crosses one
    env = {"n1": ahead, "n2": behind, "n3": ahead, "n4": behind}
    probe = [sys.executable, "-c", "import time; print(time.time())"]
    for offset, skew in ((3, ahead), (-3, behind)):  # the processes' clocks really are off
        shown = subprocess.run(probe, env={**os.environ, **skew}, capture_output=True, text=True)
        assert abs(float(shown.stdout) - time.time() - offset) < 1, (shown.stdout, offset)
    with hosts_ring(tmp_path, NODES, stages=2, replicas=2, node_env=env) as ring:
        spans = [s["replicas"] for s in ring.cluster()["placements"]["demo"]["spans"]]
        # one per span, the first span's ahead and the second's behind where the placement
        # allows: a hop then goes from a clock 3 s ahead to one 3 s behind
        want = [ahead, behind]
        skewed = [
            next((n for n in span if env[n] is want[i]), span[0]) for i, span in enumerate(spans)
        ]
        assert len(skewed) == 2, spans
        figures = skewed_clocks(ring, skewed, deadline_s=5.0)
        report("clocks 3 s off, 5 s deadlines", figures)
        assert all(figures.details["skewed_healthy"])  # heartbeats signed off-clock accepted
        assert_served(figures)
        tight = skewed_clocks(ring, skewed, deadline_s=2.0)
        report("clocks 3 s off, 2 s deadlines", tight)
        # hops carry the time left, not an instant: a node 3 s ahead keeps a 2 s budget
        assert_served(tight)


def test_a_generation_stream_whose_span_node_is_cut_off_completes(tmp_path: Path) -> None:
    require_hosts()
    from tests.support.hosts_generation import MODEL, stream_with_pulled_link, tiny_repo

    with hosts_ring(
        tmp_path, NODES, stages=2, replicas=2, repo=tiny_repo, model=MODEL,
        coordinator=("--step-timeout-s", "2", "--max-tokens-limit", "1000"),
    ) as ring:  # fmt: skip
        figures = stream_with_pulled_link(ring)
        print(f"\ngeneration stream, span node's link pulled: {json.dumps(figures)}")
        assert figures["victim"] and figures["failed"] == 0, figures
        assert figures["replays"] >= 1, figures  # the cut-off node's sequences went elsewhere
        assert figures["largest_gap_s"] < 2 + 5, figures  # caught by step_timeout_s (2 s)
