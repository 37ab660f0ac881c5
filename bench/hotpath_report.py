"""bench/hotpath.py's summary (medians over rounds, per-round ratios) and its printed tables."""

from __future__ import annotations

import statistics
from typing import Any

BASELINE = "in-process onnxruntime, batches of 32"
TODAY_STOLEN = "lever: in-process, today,"
SERVED_KEYS = ("p50_ms", "p99_ms", "generator_cores", "server_cores", "idle_servers_cores")


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


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per system and concurrency: medians over rounds, and the median of each round's ratio
    to the in-process baseline (and to the faster Ray ingress) at that concurrency."""
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
    return {"systems": systems, "added_latency_c1_p50_ms": added}


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


def _pick(summary: dict[str, Any], prefix: str) -> tuple[str, dict[str, Any]] | None:
    for name, points in summary["systems"].items():
        if name.startswith(prefix):
            return name, points
    return None


def lever_table(summary: dict[str, Any]) -> list[str]:
    """Threading before/after: each variant against today's setting in the same conditions."""
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


def print_levers(summary: dict[str, Any]) -> None:
    lines = lever_table(summary)
    if len(lines) > 2:
        print("\nlever: onnxruntime threading (medians; × today = variant / today's setting)")
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
    return lines


if __name__ == "__main__":  # python -m bench.hotpath_report RESULT.json: the docs' tables
    import json
    import sys
    from pathlib import Path

    print("\n".join(markdown_section(json.loads(Path(sys.argv[1]).read_text()))))
