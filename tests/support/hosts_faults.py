"""Faults of a network, on a ring of test hosts (tests/support/hosts.py) under a load of clients
in their own host: each scenario returns its figures; tests/hosts asserts on them and
bench/hosts.py reports them. A ring is 2 spans x 2 replicas of the small demo model: span 0 on
n1 and n3, span 1 on n2 and n4 (the placement is read, not assumed)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tests.support.faults.common import (
    NO_CACHE,
    answer_matches,
    infer_request,
    post,
    reference,
    token_rows,
)
from tests.support.hosts import HostRing, TimedLoad, percentile

NODES = ["n1", "n2", "n3", "n4"]
CLIENTS = 8
MAX_REQUESTS = 50_000  # a bound whatever the machine's speed; time ends the loads first


@dataclass
class Figures:
    """What one scenario measured."""

    sent: int = 0
    failed: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # named latencies and durations
    details: dict[str, Any] = field(default_factory=dict)

    def take(self, load: TimedLoad) -> None:
        self.sent += load.tally.sent
        self.failed += load.tally.failed
        for status, count in load.tally.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + count
        self.errors += load.tally.errors


def replicas_of(ring: HostRing) -> list[list[str]]:
    return [s["replicas"] for s in ring.cluster()["placements"]["demo"]["spans"]]


def spans_held(ring: HostRing) -> dict[str, list[tuple[int, int]]]:
    return {
        n["node_id"]: sorted((s["first"], s["last"]) for s in n.get("spans", []))
        for n in ring.cluster()["nodes"]
    }


def loaded(ring: HostRing, seconds: float, *, timeout_us: int | None = None) -> TimedLoad:
    """A load of CLIENTS clients for ``seconds``; the finished load."""
    with ring.load(token_rows(16), CLIENTS, MAX_REQUESTS, timeout_us=timeout_us) as load:
        time.sleep(seconds)
    return load


def link_pulled(ring: HostRing, before_s: float = 1.5, pulled_s: float = 4.0) -> Figures:
    """A first-span node's cable pulled mid-load (its connections hang, nothing resets them),
    plugged back after ``pulled_s``; the slowest answer to a request in flight while it was out."""
    figures = Figures()
    victim = replicas_of(ring)[0][0]
    with ring.load(token_rows(16), CLIENTS, MAX_REQUESTS) as load:
        time.sleep(before_s)
        pulled = time.monotonic()
        ring.hosts.pull(ring.node_hosts[victim])
        time.sleep(pulled_s)
        ring.hosts.plug(ring.node_hosts[victim])
        plugged = time.monotonic()
        time.sleep(1.0)
    figures.take(load)
    before = [a[1] for a in load.answers if a[0] + a[1] < pulled]
    during = load.window(pulled, plugged)
    figures.seconds = {
        "p99_before": percentile(before, 0.99),
        "slowest_during_pull": max((a[1] for a in during), default=0.0),
        "p99_during_pull": percentile([a[1] for a in during], 0.99),
    }
    figures.details = {"victim": victim, "answered_during_pull": len(during)}
    return figures


def loss_on_link(ring: HostRing, percent: int = 5, seconds: float = 4.0) -> Figures:
    """``percent`` % of a second-span node's packets lost each way, under load."""
    figures = Figures()
    victim = replicas_of(ring)[1][0]
    baseline = loaded(ring, 2.0)
    ring.hosts.loss(ring.node_hosts[victim], percent)
    try:
        load = loaded(ring, seconds)
        dropped = ring.hosts.dropped(ring.node_hosts[victim])
    finally:
        ring.hosts.heal(ring.node_hosts[victim])
    figures.take(load)
    figures.seconds = {
        "p50_clean": percentile([a[1] for a in baseline.answers], 0.5),
        "p99_clean": percentile([a[1] for a in baseline.answers], 0.99),
        "p50_loss": percentile([a[1] for a in load.answers], 0.5),
        "p99_loss": percentile([a[1] for a in load.answers], 0.99),
        "slowest_loss": max((a[1] for a in load.answers), default=0.0),
    }
    figures.details = {"victim": victim, "percent": percent, "dropped_packets": dropped,
                       "clean_failed": baseline.tally.failed}  # fmt: skip
    return figures


def skewed_clocks(
    ring: HostRing, skewed: list[str], deadline_s: float = 5.0, seconds: float = 3.0
) -> Figures:
    """Requests with a ``deadline_s`` timeout through nodes whose clocks are off (started so by
    the caller): the other replicas' hosts are cut off first, so every hop crosses a skewed node."""
    figures = Figures()
    others = [r for span in replicas_of(ring) for r in span if r not in skewed]
    for node in others:
        ring.hosts.pull(ring.node_hosts[node])
    try:
        # the cut-off replicas must leave the routes before the load counts
        end = time.monotonic() + 15
        while time.monotonic() < end:
            healthy = {n["node_id"] for n in ring.cluster()["nodes"] if n["healthy"]}
            if not healthy & set(others):
                break
            time.sleep(0.1)
        load = loaded(ring, seconds, timeout_us=int(deadline_s * 1e6))
    finally:
        for node in others:
            ring.hosts.plug(ring.node_hosts[node])
    figures.take(load)
    health = {n["node_id"]: n["healthy"] for n in ring.cluster()["nodes"]}
    figures.details = {"skewed": skewed, "skewed_healthy": [health[n] for n in skewed],
                       "deadline_s": deadline_s}  # fmt: skip
    figures.seconds = {"p99": percentile([a[1] for a in load.answers], 0.99)}
    return figures


def _probe_until_served(ring: HostRing, timeout_s: float) -> float:
    """Seconds until one request from the client host gets the right answer."""
    ids = token_rows(1, seed=7)[0]
    want = reference(ids)
    body, headers = infer_request(ids)
    started = time.monotonic()
    with ring.hosts.inside(ring.client_host):
        while time.monotonic() - started < timeout_s:
            answer = post(
                ring.url + "/v2/models/demo/infer",
                body,
                {**headers, **NO_CACHE},
                timeout=2,
            )
            if answer_matches(answer, want):
                return time.monotonic() - started
            time.sleep(0.02)
    raise TimeoutError(f"the ring did not serve within {timeout_s}s")


def coordinator_partitioned(ring: HostRing, held_s: float = 4.0) -> Figures:
    """The coordinator's host cut off from every node (both ways) for ``held_s`` (beyond the
    nodes' timeout, short of replace_after_s), then healed: how soon the ring serves again, and
    whether every node kept its spans."""
    figures = Figures()
    spans_before, replicas_before = spans_held(ring), replicas_of(ring)
    nodes = list(ring.node_hosts.values())
    ring.hosts.partition(ring.coordinator_host, nodes)
    started = time.monotonic()
    ids = token_rows(1, seed=8)[0]
    body, headers = infer_request(ids, timeout_us=2_000_000)
    with ring.hosts.inside(ring.client_host):  # what a client gets meanwhile
        cut_off = post(ring.url + "/v2/models/demo/infer", body, {**headers, **NO_CACHE}, 10)
    time.sleep(max(0.0, held_s - (time.monotonic() - started)))
    status, _ = ring.http("GET", "/v2/health/ready", timeout=5)
    dropped = ring.hosts.dropped(ring.coordinator_host)
    ring.hosts.heal(ring.coordinator_host)
    healed = time.monotonic()
    served_after = _probe_until_served(ring, 30)
    ready_after = None
    while time.monotonic() - healed < 30:
        if ring.http("GET", "/v2/health/ready", timeout=5)[0] == 200:
            ready_after = time.monotonic() - healed
            break
        time.sleep(0.05)
    load = loaded(ring, 2.0)
    figures.take(load)
    figures.seconds = {"served_after_heal": served_after, "ready_after_heal": ready_after or -1}
    figures.details = {
        "ready_status_while_partitioned": status,
        "dropped_packets": dropped,
        "request_while_partitioned": [cut_off.status, round(cut_off.seconds, 2)],
        "spans_kept": spans_held(ring) == spans_before,
        "placement_kept": replicas_of(ring) == replicas_before,
    }
    return figures


def rejoined_from_new_address(ring: HostRing) -> Figures:
    """A second-span node killed, its host given a new address, the node started again with its
    id: it must be routed at its new address (its partner's cable is pulled to make sure)."""
    figures = Figures()
    span = replicas_of(ring)[1]
    moved, partner = span[0], span[1]
    host = ring.node_hosts[moved]
    old = ring.hosts[host].address
    ring.kill_node(moved)
    new = ring.hosts.readdress(host)
    started = time.monotonic()
    ring.start_node(host, moved)
    want = f"https://{new}:9100"
    address = ""
    while time.monotonic() - started < 30:
        member = {n["node_id"]: n for n in ring.cluster()["nodes"]}[moved]
        address = member["address"]
        if address == want and member["healthy"]:
            break
        time.sleep(0.1)
    rejoined = time.monotonic() - started
    ring.hosts.pull(ring.node_hosts[partner])
    try:
        time.sleep(2.5)  # the partner leaves the routes (node_timeout_s 2)
        load = loaded(ring, 2.0)
    finally:
        ring.hosts.plug(ring.node_hosts[partner])
    figures.take(load)
    figures.seconds = {"rejoined_after_start": rejoined}
    figures.details = {"old": old, "new": new, "address_seen": address, "moved": moved}
    return figures


def next_span_unreachable(ring: HostRing, seconds: float = 4.0) -> Figures:
    """A first-span node that still heartbeats the coordinator but cannot reach one replica of
    the next span (one way: nothing it sends there arrives), under load."""
    figures = Figures()
    spans = replicas_of(ring)
    node, unreachable = spans[0][0], spans[1][0]
    baseline = loaded(ring, 1.5)
    ring.hosts.partition(ring.node_hosts[node], [ring.node_hosts[unreachable]], both_ways=False)
    try:
        load = loaded(ring, seconds)
        healthy = {n["node_id"]: n["healthy"] for n in ring.cluster()["nodes"]}
        dropped = ring.hosts.dropped(ring.node_hosts[node])
    finally:
        ring.hosts.heal(ring.node_hosts[node])
    figures.take(load)
    late = [a[1] for a in load.answers if a[0] >= load.answers[0][0] + seconds / 2]
    figures.seconds = {
        "p99_clean": percentile([a[1] for a in baseline.answers], 0.99),
        "p99_cut": percentile([a[1] for a in load.answers], 0.99),
        "slowest_cut": max((a[1] for a in load.answers), default=0.0),
        "p99_second_half": percentile(late, 0.99),
    }
    figures.details = {"node": node, "unreachable": unreachable, "healthy": healthy,
                       "dropped_packets": dropped}  # fmt: skip
    return figures
