"""bench/hotpath.py's summary (medians over rounds, per-round ratios) and its printed tables."""

from __future__ import annotations

import statistics
from typing import Any

BASELINE = "in-process onnxruntime, batches of 32"
TODAY_STOLEN = "lever: in-process, today,"
_REFERENCE = {BASELINE: "in-process, today's threads, 1-row run"}  # its c=1 point
SERVED_KEYS = (
    "p50_ms",
    "p99_ms",
    "generator_cores",
    "server_cores",
    "idle_servers_cores",
    "rows_per_run",
)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _ray_best(round_: dict[str, Any], concurrency: str) -> float | None:
    rates = [
        points[concurrency]["rows_per_s"]
        for name, points in round_.items()
        if name.startswith("Ray") and concurrency in points
    ]
    return max(rates) if rates else None


def summarise(
    rounds: list[dict[str, Any]],
    pairs: list[tuple[str, str]] | None = None,
    interleaved: list[dict[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Per system and concurrency: medians over rounds, and the median of each round's ratio
    to the in-process baseline (and to the faster Ray ingress) at that concurrency; per
    (today, variant) pair of ``pairs``, the median of each round's ratio between the two."""
    systems: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        systems[name] = {}
        for concurrency in rounds[0][name]:
            rows = [r[name][concurrency] for r in rounds if concurrency in r.get(name, {})]
            point: dict[str, Any] = {
                "rows_per_s": _median([row["rows_per_s"] for row in rows]),
                "failures": sum(int(row.get("failures", 0)) for row in rows),
            }
            for key in SERVED_KEYS:
                point[key] = _median([row.get(key) for row in rows])
            baseline = [
                r[name][concurrency]["rows_per_s"] / r[BASELINE][concurrency]["rows_per_s"]
                for r in rounds
                if concurrency in r.get(BASELINE, {})
            ]
            point["x_in_process"] = _median(baseline)
            ray = [(r[name][concurrency]["rows_per_s"], _ray_best(r, concurrency)) for r in rounds]
            point["x_best_ray"] = _median([a / b if b else None for a, b in ray])
            if rows and "ray_settings" in rows[0]:
                point["ray_settings"] = rows[0]["ray_settings"]
            systems[name][concurrency] = point
    added = {}
    for name in systems:
        if name == BASELINE or "1" not in systems[name]:
            continue
        deltas = [
            r[name]["1"]["p50_ms"] - r[BASELINE]["1"]["p50_ms"]
            for r in rounds
            if "1" in r.get(name, {}) and "1" in r.get(BASELINE, {})
        ]
        added[name] = _median(deltas)
    compared = [_pair(rounds, a, b) for a, b in pairs or [] if a in rounds[0] and b in rounds[0]]
    summary = {"systems": systems, "added_latency_c1_p50_ms": added, "pairs": compared}
    if interleaved:
        summary["interleaved_c1"] = _interleaved(interleaved)
    return summary


def _interleaved(probes: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per system: the median p50 over rounds, and the median of each round's p50 less the
    in-process 1-row run's p50 of the same round (its added latency)."""
    out = {}
    for name in probes[0]:
        deltas = [
            p[name]["p50_ms"] - p[BASELINE]["p50_ms"]
            for p in probes
            if p[name]["p50_ms"] is not None and p[BASELINE]["p50_ms"] is not None
        ]
        out[name] = {
            "p50_ms": _median([p[name]["p50_ms"] for p in probes]),
            "p99_ms": _median([p[name]["p99_ms"] for p in probes]),
            "added_ms": _median(deltas),
            "requests": sum(p[name]["requests"] for p in probes),
            "failures": sum(p[name]["failures"] for p in probes),
        }
    return out


def _pair(rounds: list[dict[str, Any]], before: str, after: str) -> dict[str, Any]:
    """A variant against today's setting: the median of each round's c=32 ratio and of each
    round's c=1 p50 difference (both measured in that round)."""
    ratios, deltas = [], []
    for r in rounds:
        b32, a32 = r[before]["32"]["rows_per_s"], r[after]["32"]["rows_per_s"]
        ratios.append(a32 / b32 if b32 else None)
        if "1" in r[before] and "1" in r[after]:
            deltas.append(r[after]["1"]["p50_ms"] - r[before]["1"]["p50_ms"])
    return {
        "today": before,
        "variant": after,
        "x_today_c32": _median(ratios),
        "c1_p50_delta_ms": _median(deltas),
        "per_round_x_today_c32": [_fmt(x, ".3f") for x in ratios],
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| system | concurrency | rows/s | × in-process | × best Ray | p50 ms | p99 ms | "
        "load generator cores | server cores | failed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, points in summary["systems"].items():
        for concurrency, p in sorted(points.items(), key=lambda kv: -int(kv[0])):
            lines.append(
                f"| {name} | {concurrency} | {_fmt(p['rows_per_s'], ',.0f')} | "
                f"{_fmt(p['x_in_process'], '.2f')} | {_fmt(p['x_best_ray'], '.2f')} | "
                f"{_fmt(p['p50_ms'], '.2f')} | {_fmt(p['p99_ms'], '.2f')} | "
                f"{_fmt(p['generator_cores'], '.2f')} | {_fmt(p['server_cores'], '.2f')} | "
                f"{p['failures']} |"
            )
    return lines


def print_tables(report: dict[str, Any]) -> None:
    summary = report["summary"]
    model = report["model"]
    print(
        f"\nMLP width {model['width']} ({model['bytes'] / 1e6:.0f} MB), {report['cpus']} cores, "
        f"{report['rounds']} round(s), medians; today's threads {report['threads_today']}; "
        f"load average at the end {tuple(round(x, 2) for x in report['load_average_end'])}"
    )
    print(
        "c=32 in process is a batch of 32 rows per run; c=1 in process is one 1-row run. "
        "Cores: the load generator's (this process) and the server's (its process tree)."
    )
    for line in markdown_table(summary):
        print(line)
    print("\nadded latency at c=1, p50 over one in-process 1-row run:")
    for name, delta in summary["added_latency_c1_p50_ms"].items():
        print(f"  {name}: {_fmt(delta, '+.2f')} ms")
    print_levers(summary)
    nodes = node_lever_table(report)
    if nodes:
        start = tuple(round(x, 2) for x in report.get("load_average_start", ()))
        print(
            "\nnode levers (medians over rounds; × today's node: median of per-round ratios; "
            "c=1 interleaved: one request to each system in turn, added = p50 less the "
            f"in-process 1-row run's in the same round); load average {start} at the start, "
            f"{tuple(round(x, 2) for x in report['load_average_end'])} at the end"
        )
        for line in nodes:
            print(line)


def _pick(summary: dict[str, Any], prefix: str) -> tuple[str, dict[str, Any]] | None:
    for name, points in summary["systems"].items():
        if name.startswith(prefix):
            return name, points
    return None


def lever_table(summary: dict[str, Any]) -> list[str]:
    """Threading before/after: each variant against today's setting in the same conditions
    (× today: the median of the per-round ratios where the run recorded its pairs)."""
    if "pairs" in summary:
        return _pairs_table(summary)
    pairs = [
        ("in-process onnxruntime", "lever: in-process, intra-op"),
        ("in-process onnxruntime", "lever: in-process, 1 thread x 2 runs"),
        ("lever: in-process, today,", "lever: in-process, intra-op 1,"),
        ("lever: in-process, today,", "lever: in-process, 1 thread x 2 in flight,"),
        ("a standalone node", "lever: standalone node"),
        ("`appliance serve` (coordinator", "lever: `appliance serve --nodes 2`"),
    ]
    lines = [
        "| today | variant | c=32 rows/s today → variant | × today | c=1 p50 ms today → variant |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for before_prefix, after_prefix in pairs:
        before, after = _pick(summary, before_prefix), _pick(summary, after_prefix)
        if before is None or after is None:
            continue
        b32, a32 = before[1]["32"], after[1]["32"]
        ratio = a32["rows_per_s"] / b32["rows_per_s"] if b32["rows_per_s"] else None
        latency = "-"
        if "1" in before[1] and "1" in after[1]:
            latency = f"{before[1]['1']['p50_ms']:.2f} → {after[1]['1']['p50_ms']:.2f}"
        lines.append(
            f"| {before[0]} | {after[0].removeprefix('lever: ')} | "
            f"{b32['rows_per_s']:,.0f} → {a32['rows_per_s']:,.0f} | {_fmt(ratio, '.2f')} | "
            f"{latency} |"
        )
    return lines


def _pairs_table(summary: dict[str, Any]) -> list[str]:
    systems = summary["systems"]
    lines = [
        "| today | variant | c=32 rows/s today → variant | × today (per-round median) | "
        "c=1 p50 ms today → variant | c=1 p50 Δ ms |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for pair in summary["pairs"]:
        before, after = systems[pair["today"]], systems[pair["variant"]]
        latency = "-"
        if "1" in before and "1" in after:
            latency = f"{before['1']['p50_ms']:.2f} → {after['1']['p50_ms']:.2f}"
        lines.append(
            f"| {pair['today']} | {pair['variant'].removeprefix('lever: ')} | "
            f"{before['32']['rows_per_s']:,.0f} → {after['32']['rows_per_s']:,.0f} | "
            f"{_fmt(pair['x_today_c32'], '.2f')} | {latency} | "
            f"{_fmt(pair['c1_p50_delta_ms'], '+.2f')} |"
        )
    return lines


def node_lever_table(report: dict[str, Any]) -> list[str]:
    """The node levers side by side: rows/s at c=32, × today's node, added latency at c=1."""
    names = [n for n in report.get("node_levers", []) if n in report["summary"]["systems"]]
    if len(names) < 2:
        return []
    summary = report["summary"]
    ratios = {p["variant"]: p for p in summary["pairs"] if p["today"] == names[0]}
    lines = [
        "| node | c=32 rows/s | × today's node | × in-process | rows per run at c=32 | "
        "server cores | c=1 p50 ms | added latency at c=1, ms | c=1 interleaved: p50 ms | "
        "added ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    probe = summary.get("interleaved_c1", {})
    for name in names:
        points = summary["systems"][name]
        ratio = 1.0 if name == names[0] else ratios.get(name, {}).get("x_today_c32")
        lines.append(
            f"| {name.removeprefix('lever: ')} | {_fmt(points['32']['rows_per_s'], ',.0f')} | "
            f"{_fmt(ratio, '.2f')} | {_fmt(points['32']['x_in_process'], '.2f')} | "
            f"{_fmt(points['32'].get('rows_per_run'), '.1f')} | "
            f"{_fmt(points['32'].get('server_cores'), '.2f')} | "
            f"{_fmt(points.get('1', {}).get('p50_ms'), '.2f')} | "
            f"{_fmt(summary['added_latency_c1_p50_ms'].get(name), '+.2f')} | "
            f"{_fmt(probe.get(name, {}).get('p50_ms'), '.2f')} | "
            f"{_fmt(probe.get(name, {}).get('added_ms'), '+.2f')} |"
        )
    for name in (n for n in probe if n not in names):  # the in-process references
        lines.append(
            f"| {_REFERENCE.get(name, name)} | | | | | | | | "
            f"{_fmt(probe[name]['p50_ms'], '.2f')} | {_fmt(probe[name]['added_ms'], '+.2f')} |"
        )
    return lines


def print_levers(summary: dict[str, Any]) -> None:
    lines = lever_table(summary)
    if len(lines) > 2:
        print("\nlevers (medians; × today = variant / today's setting)")
        for line in lines:
            print(line)
    idle = [
        p["idle_servers_cores"]
        for points in summary["systems"].values()
        for p in points.values()
        if p.get("idle_servers_cores") is not None
    ]
    if idle:
        print(
            "servers up but not measured, during in-process and Ray points: "
            f"median {statistics.median(idle):.3f} cores, at most {max(idle):.3f}"
        )


def markdown_section(report: dict[str, Any]) -> list[str]:
    """The figures of a run as docs/performance.md shows them: the table, the added latency
    at c=1 and the threading lever."""
    summary = report["summary"]
    lines = markdown_table(summary)
    lines += [
        "",
        "| added latency at c=1, p50 over one in-process 1-row run | ms |",
        "| --- | ---: |",
    ]
    lines += [
        f"| {name} | {_fmt(delta, '+.2f')} |"
        for name, delta in summary["added_latency_c1_p50_ms"].items()
    ]
    levers = lever_table(summary)
    if len(levers) > 2:
        lines += [""] + levers
    nodes = node_lever_table(report)
    if nodes:
        lines += [""] + nodes
    return lines


if __name__ == "__main__":  # python -m bench.hotpath_report RESULT.json: the docs' tables
    import json
    import sys
    from pathlib import Path

    print("\n".join(markdown_section(json.loads(Path(sys.argv[1]).read_text()))))
