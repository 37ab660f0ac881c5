"""Every fault scenario with loads larger than the tests' (about 3 minutes on 2 cores): prints
each record, writes a JSON report under bench/results/ and ``docs/reliability.md``.

    python -m bench.faults [--scale 1.0] [--only NAME ...] [--docs DIR] [--out FILE]

``--scale`` multiplies every load; ``--only`` runs some scenarios and leaves the document alone,
except a run of every connection scenario (``--only`` the names in CONNECTIONS), which
rewrites the document's "Connections and overload" section, and of ``version_switch``, which
rewrites "Version switches", and of ``generation_failover`` with ``stalled_stream``, which
rewrite theirs; the rest is kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from bench.report import save_report, write_keeping_others
from tests.support.faults.clients import connection_flood, slow_clients
from tests.support.faults.common import DOCS, FaultRecord
from tests.support.faults.generation import generation_failover, stalled_stream
from tests.support.faults.inputs import BODY_LIMIT, MAX_ELEMENTS, bad_input_flood
from tests.support.faults.overload import overload
from tests.support.faults.ring import (
    coordinator_kill_with_jobs,
    internal_calls_unsigned_or_replayed,
    node_hang,
    node_kill,
    node_other_version_never_routed,
    node_restarted_with_other_version,
)
from tests.support.faults.storage import (
    cache_dir_removed,
    cache_map_full,
    export_disk_full,
    export_disk_full_tmpfs,
    segment_sha256_mismatch,
)
from tests.support.switch import version_switch

SCENARIOS: dict[str, Callable[[Path, float], list[FaultRecord]]] = {
    "node_kill": lambda w, s: [node_kill(w, int(10_000 * s), 32)],
    "node_hang": lambda w, s: [node_hang(w, int(4000 * s), 16)],
    "node_other_version": lambda w, s: [node_other_version_never_routed(w, int(3000 * s), 50)],
    "node_restart_other_version": lambda w, s: [
        node_restarted_with_other_version(w, int(40_000 * s), 16)
    ],
    "coordinator_kill": lambda w, s: [coordinator_kill_with_jobs(w, int(2000 * s))],
    "cache_map_full": lambda w, s: [cache_map_full(w, int(6000 * s), 16)],
    "cache_dir_removed": lambda w, s: [cache_dir_removed(w, int(6000 * s), 16)],
    "segment_sha256": lambda w, s: [segment_sha256_mismatch(w, int(5000 * s), 16)],
    "export_disk_full": lambda w, s: [
        export_disk_full(w, max(2, int(6 * s))),
        export_disk_full_tmpfs(w / "tmpfs", max(3, int(10 * s))),
    ],
    "internal_calls": lambda w, s: internal_calls_unsigned_or_replayed(w, max(5, int(200 * s))),
    "bad_input": lambda w, s: bad_input_flood(w, max(5, int(500 * s)), 16),
    # connections and overload (issue 18): the default timeouts, real descriptor limits
    "slow_clients": lambda w, s: [slow_clients(w)],
    "connection_flood": lambda w, s: [
        connection_flood(w, int(3000 * s), 30.0, "1024:20000", max_connections=900)
    ],
    "connection_flood_emfile": lambda w, s: [
        connection_flood(
            w,
            int(3000 * s),
            20.0,
            "1024:1024",
            max_connections=5000,
            label="flood past the descriptor limit (cap set above it)",
        )
    ],
    "connection_flood_20k": lambda w, s: [
        connection_flood(
            w,
            int(20_000 * s),
            30.0,
            "",
            max_connections=0,
            label="flood of 20,000 connections at the machine's own limit",
            processes=2,
        )
    ],
    "overload": lambda w, s: [overload(w, overload_s=30.0 * max(s, 0.2))],
    # a new version under load (issue 14): side by side, rollback by name, rolling
    "version_switch": lambda w, s: version_switch(w, clients=max(2, int(8 * s))),
    # generation: a node killed, then one frozen, mid-stream (issue 16)
    "generation_failover": lambda w, s: generation_failover(w, max(2, int(8 * s)), 32),
    "stalled_stream": lambda w, s: [stalled_stream(w, max(100, int(400 * s)))],
}
CONNECTIONS = [
    "slow_clients",
    "connection_flood",
    "connection_flood_emfile",
    "connection_flood_20k",
    "overload",
]


def run_all(work: Path, scale: float, only: list[str] | None = None) -> list[FaultRecord]:
    records: list[FaultRecord] = []
    for name, scenario in SCENARIOS.items():
        if only and name not in only:
            continue
        print(f"running {name} ...", flush=True)
        for record in scenario(work / name, scale):
            print(
                f"  {record.fault}: sent {record.sent}, failed {record.failed}, "
                f"5xx {record.status_5xx}, 500 {record.status_500}, jobs lost "
                f"{record.jobs_lost}; {record.outcome} ({record.seconds} s)",
                flush=True,
            )
            records.append(record)
    return records


def write_markdown(records: list[FaultRecord], when: str, seconds: float, docs: Path) -> Path:
    faults = [r for r in records if r.group == "fault"]
    bad = [r for r in records if r.group == "bad input"]
    connections = [r for r in records if r.group == "connections"]
    kills = [r for r in faults if r.fault.startswith(("node kill", "node hung"))]
    lines = [
        "# Reliability",
        "",
        f"Produced by `python -m bench.faults` on {when} ({os.cpu_count()} cores, "
        f"{seconds:.0f} s in all). Every fault below was injected into real coordinator and node "
        "processes on loopback, under the load shown; the counts are from that run. "
        "`tests/faults/` runs the same scenarios (`bench/faults/`) with smaller loads and "
        "asserts these counts. Regenerate with `python -m bench.faults`.",
        "",
        "- **sent**: requests (and job submissions) sent; **failed**: answers other than the "
        "expected one (for a good request, a 200 equal to the model run in process; for a bad "
        "one, its documented 4xx with a JSON error; for a refusal, the refusal);",
        "- **5xx** counts every 5xx answer, documented refusals (503, not ready or no live "
        "replica) included; **500** the answers that would be bugs;",
        "- **jobs lost**: async jobs answered 202 that did not end `succeeded` with the right "
        "result; for an export, **sent** counts attempts and **failed** those that left files "
        "behind or an incomplete package.",
        "",
        f"In all: {sum(r.sent for r in records):,} requests and attempts; "
        f"{sum(r.failed for r in kills)} failed under a node killed or hung (2 replicas per "
        f"span), {sum(r.failed for r in records)} failed in all, "
        f"{sum(r.jobs_lost for r in records)} of {sum(r.jobs_accepted for r in records):,} "
        f"jobs lost, {sum(r.status_500 for r in records)} answers 500.",
        "",
        "## Faults",
        "",
        _table(faults, jobs=True),
        "",
        "## Bad input",
        "",
        "Malformed requests of each kind sent to a live coordinator (1 node, body limit "
        f"{BODY_LIMIT // 1024} KiB, at most {MAX_ELEMENTS:,} elements per tensor), each followed "
        "by a good request, from concurrent clients"
        + (f", {bad[0].seconds:g} s for the whole group." if bad else "."),
        "",
        _table(bad, jobs=False, seconds=False),
        "",
        *connections_section(connections, when),
        *switch_section([r for r in records if r.group == "switch"], when),
        *generation_section([r for r in records if r.group == "generation"], when),
    ]
    out = docs / "reliability.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    # sections other benches write there (bench.hosts) are kept
    return write_keeping_others(out, "\n".join(lines))


CONNECTIONS_TITLE = "## Connections and overload"


def connections_section(records: list[FaultRecord], when: str) -> list[str]:
    """The misbehaving clients, floods and overload: what was opened and ended, how the good
    requests fared among them, and what the log grew by."""
    if not records:
        return []
    head = ["fault", "load", "connections opened", "ended by the server, by reason"]
    head += ["good answered", "good p99 ms", "log bytes", "outcome", "s"]
    rows = [head, ["---" if i in (0, 1, 3, 7) else "---:" for i in range(len(head))]]
    for r in records:
        d = r.details
        opened = d.get("flood", {}).get("opened")
        if "overload" in d:
            opened = sum(d[k].get("connections_opened", 0) for k in ("half", "overload", "after"))
        reasons = d.get("closed_by_reason") or {}
        ended = ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items()) if k != "other")
        good = d.get("good_answered")
        p99 = d.get("good_p99_ms")
        if "overload" in d:
            good, p99 = d["overload"]["ok"], d["overload"]["ok_p99_ms"]
            ended = f"503 {d['overload']['statuses'].get('503', 0):,} (admission)"
        cells = [r.fault, r.load, opened, ended or "-", good, p99, d.get("log_bytes"), r.outcome]
        cells.append(r.seconds)
        rows.append(
            [
                f"{c:,}" if isinstance(c, int) else "-" if c is None else str(c).replace("|", "/")
                for c in cells
            ]
        )
    return [
        CONNECTIONS_TITLE,
        "",
        f"Measured {when}. Clients that stall one phase of a request, floods of incomplete "
        "connections (each sends the headers of a POST with a 100 KB body and one byte of "
        "it, and connects again when ended) from their own processes, and an open-loop load "
        "at twice the measured capacity from a generator in its own process (its CPU in the "
        "outcome). Good requests run meanwhile on fresh connections; the log counted is the "
        "coordinator's, its access log included. Aims: a stalled phase ends within its "
        "timeout + 1 s; during a flood a good request is answered within 5 s and the log "
        "grows by less than 1 MB; at 2x capacity the admitted p99 is at most 3x the p99 at "
        "0.5x, 503s (with Retry-After) have p99 <= 100 ms, no client times out, RSS grows "
        "10 % at most, and p99 is back within 1.5x of the baseline 5 s after. The servers, "
        "the generator and the floods share the machine's cores: the latencies count the "
        "generator's own lag. An aim a run missed is named in its outcome (FAILED).",
        "",
        "\n".join("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


SWITCH_TITLE = "## Version switches"


def switch_section(records: list[FaultRecord], when: str) -> list[str]:
    """A new version of the demo model loaded, and rolled back, under a closed-loop load."""
    if not records:
        return []
    return [
        SWITCH_TITLE,
        "",
        f"Measured {when}. Version 2 of the demo model (other weights, other answers) loaded "
        "while clients send requests with the cache bypassed: every answer is checked against "
        "the version that served it (its digest in the answer), and no request may fail or "
        "mix versions. Side by side: the new version is placed next to the old one, then "
        "switched to at once; rolling: the nodes' memory holds one version, so each span is "
        "replaced replica by replica. RSS is the nodes' highest while both were loaded; **s** "
        "is how long the load call took.",
        "",
        _table(records, jobs=False),
        "",
    ]


GENERATION_TITLE = "## Generation: a node lost mid-stream"


def generation_section(records: list[FaultRecord], when: str) -> list[str]:
    """Streams through a node killed, then through one frozen."""
    if not records:
        return []
    return [
        GENERATION_TITLE,
        "",
        f"Measured {when}. SmolLM2 in 2 spans x 2 replicas on four node processes; greedy "
        "streams at once, cache bypassed, first undisturbed, then with a node that reports a "
        "live sequence killed once every stream has a token, then with a node of the other "
        "span frozen. **failed** counts streams that ended in an error or whose tokens differ "
        "from the undisturbed run's other than at a fp32 near-tie (top-1 / top-2 logit gap "
        "under 2e-3); **5xx** the streams that ended in an error. The last row: a stream "
        "whose client stops reading (a socket with a 4 KiB receive buffer), beside one read "
        "as it comes on the tiny test model; failed if it is not ended or leaves KV behind.",
        "",
        _table(records, jobs=False),
        "",
    ]


def replace_section(doc: Path, title: str, lines: list[str]) -> Path:
    """Rewrite only the section ``title`` of an existing reliability.md (appended if absent)."""
    text = doc.read_text() if doc.exists() else "# Reliability\n"
    before, _, rest = text.partition(title)
    after = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
    section = "\n".join(lines)
    doc.write_text(before.rstrip("\n") + "\n\n" + section + ("\n" + after if after else ""))
    return doc


def _table(records: list[FaultRecord], jobs: bool, seconds: bool = True) -> str:
    head = ["fault", "load", "sent", "failed", "4xx", "5xx", "500"]
    head += ["jobs accepted", "jobs lost"] if jobs else []
    head += ["outcome"] + (["s"] if seconds else [])
    rule = ["---" if name in ("fault", "load", "outcome") else "---:" for name in head]
    rows = [head, rule]
    for r in records:
        cells = [r.fault, r.load, r.sent, r.failed, r.status_4xx, r.status_5xx, r.status_500]
        cells += [r.jobs_accepted, r.jobs_lost] if jobs else []
        cells += [r.outcome] + ([r.seconds] if seconds else [])
        rows.append([f"{c:,}" if isinstance(c, int) else str(c).replace("|", "/") for c in cells])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every load")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="these scenarios")
    parser.add_argument("--docs", type=Path, default=DOCS, help="where reliability.md goes")
    parser.add_argument("--out", type=Path, help="JSON report (default bench/results/)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        records = run_all(Path(tmp), args.scale, args.only)
    seconds = time.perf_counter() - started
    when = time.strftime("%Y-%m-%d %H:%M")
    report = {
        "bench": "faults",
        "when": when,
        "cpus": os.cpu_count(),
        "scale": args.scale,
        "seconds": round(seconds, 1),
        "records": [asdict(r) for r in records],
    }
    save_report(report, args.out, "faults")
    if not args.only:  # a partial run would drop rows from the document
        print(f"wrote {write_markdown(records, when, seconds, args.docs)}")
    else:  # whole sections only: every connection scenario, or the version switch
        doc = args.docs / "reliability.md"
        if set(CONNECTIONS) <= set(args.only):
            connections = connections_section([r for r in records if r.group == "connections"],
                                              when)  # fmt: skip
            print(f"wrote {replace_section(doc, CONNECTIONS_TITLE, connections)} (connections)")
        if {"generation_failover", "stalled_stream"} <= set(args.only):
            lines = generation_section([r for r in records if r.group == "generation"], when)
            print(f"wrote {replace_section(doc, GENERATION_TITLE, lines)} (generation)")
        if "version_switch" in args.only:
            switches = switch_section([r for r in records if r.group == "switch"], when)
            print(f"wrote {replace_section(doc, SWITCH_TITLE, switches)} (version switches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
