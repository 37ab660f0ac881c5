"""python -m bench.hosts: a ring on test hosts against the same ring on loopback.

The same 2 spans x 2 replicas of the small demo model, TLS and signed hops on both: once on five
network-namespace hosts (coordinator, 4 nodes, and a client host) whose links are limited to
``--rate`` with tc tbf, once as processes on 127.0.0.1. Rounds alternate between the two (a load
of ``--clients`` for ``--seconds`` each); medians of the rounds' throughput, p50 and p99, and
their ratios. Then a first-span node's cable is pulled under load on the hosts: the slowest answer
in flight, the time from the pull until a request sent after it is answered, and answers slower
than 1 s. Needs root and iproute2 (tests/support/hosts_net.py).

The per-hop network share of each variant comes from GET /v2/cluster before and after each
round: the links' network seconds (each caller's time less what the callee says it spent) over
those plus the nodes' compute seconds on hops, summed over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import save_report
from tests.support.faults.common import make_repo, token_rows
from tests.support.harness import Ring, http
from tests.support.hosts import TimedLoad, hosts_ring, percentile
from tests.support.hosts_faults import MAX_REQUESTS, NODES, replicas_of
from tests.support.hosts_net import unavailable_reason


class LoopbackRing(Ring):
    """tests/support/harness.py's Ring, over HTTPS (its members get the TLS flags)."""

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.coordinator_port}"


def round_figures(load: TimedLoad, seconds: float) -> dict[str, float]:
    latencies = [a[1] for a in load.answers]
    return {
        "throughput_rps": round(load.tally.ok / seconds, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "failed": load.tally.failed,
    }


def split(view: dict[str, Any]) -> dict[str, float]:
    """Link network seconds and calls, and the nodes' compute seconds and hops, so far."""
    links = [row for row in view.get("links", []) if row["from"] != row["to"]]
    compute = [n.get("load", {}).get("hop_compute", {}).get("hop", {}) for n in view["nodes"]]
    return {
        "network_s": sum(row.get("network_s", 0.0) for row in links),
        "calls": sum(row.get("calls", 0) for row in links),
        "compute_s": sum(c.get("seconds", 0.0) for c in compute),
        "hops": sum(c.get("count", 0) for c in compute),
    }


def network_share(deltas: list[dict[str, float]]) -> dict[str, float]:
    """The rounds' summed split: network share, and per call / per hop milliseconds."""
    total = {
        key: sum(d[key] for d in deltas) for key in ("network_s", "calls", "compute_s", "hops")
    }
    spent = total["network_s"] + total["compute_s"]
    return {
        "network_share": round(total["network_s"] / spent, 3) if spent else float("nan"),
        "network_ms_per_call": round(1e3 * total["network_s"] / max(total["calls"], 1), 3),
        "compute_ms_per_hop": round(1e3 * total["compute_s"] / max(total["hops"], 1), 3),
        "calls": total["calls"],
    }


def loopback_round(url: str, clients: int, seconds: float) -> dict[str, float]:
    load = TimedLoad(url, token_rows(16), clients, MAX_REQUESTS)
    with load:
        time.sleep(seconds)
    return round_figures(load, seconds)


def hosts_round(ring: Any, clients: int, seconds: float) -> dict[str, float]:
    """One round on the hosts: the load's threads start in the client host."""
    with ring.load(token_rows(16), clients, MAX_REQUESTS) as load:
        time.sleep(seconds)
    return round_figures(load, seconds)


def pulled_link(ring: Any, clients: int, seconds: float) -> dict[str, Any]:
    victim = replicas_of(ring)[0][0]
    with ring.load(token_rows(16), clients, MAX_REQUESTS) as load:
        time.sleep(1.5)
        pulled = time.monotonic()
        ring.hosts.pull(ring.node_hosts[victim])
        time.sleep(seconds)
        ring.hosts.plug(ring.node_hosts[victim])
        plugged = time.monotonic()
    during = load.window(pulled, plugged)
    after = [a for a in load.answers if a[0] >= pulled and a[2]]
    first_after = min((a[0] + a[1] for a in after), default=pulled) - pulled
    return {
        "victim": victim,
        "failed": load.tally.failed,
        "answered_during_pull": len(during),
        "slowest_during_pull_s": round(max((a[1] for a in during), default=0.0), 3),
        "first_answer_sent_after_pull_s": round(first_after, 3),
        "slower_than_1s": sum(1 for a in during if a[1] > 1.0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="load per round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rate", default="1gbit", help="tc tbf rate of every host's link")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"bench.hosts: {reason}", file=sys.stderr)
        return 2
    rounds: dict[str, list[dict[str, float]]] = {"hosts": [], "loopback": []}
    deltas: dict[str, list[dict[str, float]]] = {"hosts": [], "loopback": []}
    with tempfile.TemporaryDirectory(prefix="bench-hosts-") as tmp:
        work = Path(tmp)
        with hosts_ring(work / "hosts", NODES, stages=2, replicas=2) as ring:
            for name in ring.hosts.names:
                ring.hosts.limit(name, args.rate)
            pki = ring.pki  # its certificate names 127.0.0.1 too
            tls = ["--tls-cert", pki["cert"], "--tls-key", pki["key"], "--tls-ca", pki["ca"]]
            loop = LoopbackRing(work / "loopback", make_repo(work / "loopback" / "repo"))
            try:
                loop.start_coordinator(*tls)
                for node in NODES:
                    loop.start_node(node, *tls)
                loop.wait_members(len(NODES))
                loop.load("demo", stages=2, replicas=2)
                loop.wait_ready()

                def view(variant: str) -> dict[str, Any]:
                    if variant == "hosts":
                        return ring.cluster()
                    status, body = http("GET", loop.url + "/v2/cluster")
                    assert status == 200, body
                    return dict(body)

                for index in range(args.rounds):
                    order = ["hosts", "loopback"] if index % 2 == 0 else ["loopback", "hosts"]
                    for variant in order:
                        before = split(view(variant))
                        if variant == "loopback":
                            row = loopback_round(loop.url, args.clients, args.seconds)
                        else:
                            row = hosts_round(ring, args.clients, args.seconds)
                        after = split(view(variant))
                        deltas[variant].append({k: after[k] - before[k] for k in after})
                        rounds[variant].append(row)
                        print(f"round {index + 1}/{args.rounds} {variant}: {row}", flush=True)
            finally:
                loop.stop()
            failover = pulled_link(ring, args.clients, 5.0)
    summary = {
        variant: {
            key: statistics.median(r[key] for r in rows)
            for key in ("throughput_rps", "p50_ms", "p99_ms")
        }
        | {"failed": sum(r["failed"] for r in rows)}
        for variant, rows in rounds.items()
    }
    ratio = {
        key: round(summary["hosts"][key] / summary["loopback"][key], 2)
        for key in ("throughput_rps", "p50_ms", "p99_ms")
        if summary["loopback"][key]
    }
    report = {
        "bench": "hosts",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpus": os.cpu_count(),
        "ring": "coordinator + 4 nodes, 2 spans x 2 replicas of the small demo model, TLS, signed",
        "rate": args.rate,
        "clients": args.clients,
        "seconds_per_round": args.seconds,
        "rounds": rounds,
        "median": summary,
        "hosts_over_loopback": ratio,
        "network_share": {variant: network_share(d) for variant, d in deltas.items()},
        "pulled_link": failover,
    }
    print(f"\n| ring ({args.clients} clients, median of {args.rounds} alternating rounds) "
          "| req/s | p50 ms | p99 ms | failed |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for variant, label in (("loopback", "loopback"), ("hosts", f"namespace hosts, {args.rate}")):
        row = summary[variant]
        print(f"| {label} | {row['throughput_rps']:.1f} | {row['p50_ms']:.1f} "
              f"| {row['p99_ms']:.1f} | {row['failed']} |")  # fmt: skip
    print(f"hosts / loopback: {ratio}")
    for variant, share in report["network_share"].items():
        print(f"per-hop network share, {variant}: {share['network_share']:.0%} of link + "
              f"compute time ({share['network_ms_per_call']} ms per call on a link, "
              f"{share['compute_ms_per_hop']} ms of a node's compute per hop, "
              f"{share['calls']} calls)")  # fmt: skip
    print(
        f"pulled link ({failover['victim']}): {failover['failed']} failed, slowest answer in "
        f"flight {failover['slowest_during_pull_s']} s, first answer to a request sent after "
        f"the pull {failover['first_answer_sent_after_pull_s']} s, "
        f"{failover['slower_than_1s']} answers over 1 s"
    )
    save_report(report, args.out, "hosts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
