"""docs/performance.md from a suite report (bench/suite.py): one table per model and tokens,
"x limit" and "x Ray" beside every figure, and PNG plots next to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.report import write_keeping_others


def write_report(report: dict[str, Any], docs: Path) -> Path:
    """docs/performance.md with one table per model and tokens, and PNG plots beside it."""
    docs.mkdir(parents=True, exist_ok=True)
    points = report["points"]
    lines = [
        "# Performance",
        "",
        f"Produced by `python -m bench` on {report['when']} ({report['cpus']} cores, "
        f"{report['threads']} onnxruntime threads everywhere, one sample per request, a "
        "keep-alive aiohttp client on the same machine). Ratios: throughput over the in-process "
        "limit (`session.run` on pre-built batches of 32) and over Ray Serve with `@serve.batch` "
        "at the same concurrency, through the better of its two ingresses at that concurrency "
        "(its default proxy or its HAProxy ingress, `RAY_SERVE_ENABLE_HA_PROXY=1`: the higher "
        'req/s for x Ray (req/s), the lower p99 for x Ray (p99)). "Generator cores" and '
        '"server cores" are the mean cores each kept busy during the point, warm-up included '
        "(psutil: the bench process, which runs the load generator, and every process it "
        "started; for Ray, its driver's load thread and the rest of its namespace). Regenerate "
        "with `python -m bench`.",
        "",
    ]
    if report.get("ray"):
        lines += ["Ray Serve settings: `" + json.dumps(report["ray"]) + "`", ""]
    groups = sorted({(p["model"], p["tokens"]) for p in points})
    for model, tokens in groups:
        limit = report["limits"].get(f"{model}/{tokens}", float("nan"))
        rows = [p for p in points if p["model"] == model and p["tokens"] == tokens]
        batched_ray = [p for p in rows if p["system"].startswith("Ray Serve + @serve.batch")]
        fastest, steadiest = best_peer(batched_ray)
        lines += [
            f"## {model}, {tokens} tokens (in-process limit {limit:.1f} rows/s)",
            "",
            "| system | body | concurrency | req/s | p50 ms | p99 ms | x limit | x Ray (req/s) "
            "| x Ray (p99) | generator cores | server cores | failed |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in rows:
            peer, calm = fastest.get(p["concurrency"]), steadiest.get(p["concurrency"])
            vs_ray = f"{p['throughput_rps'] / peer['throughput_rps']:.2f}" if peer else ""
            vs_p99 = f"{p['p99_ms'] / calm['p99_ms']:.2f}" if calm else ""
            lines.append(
                f"| {p['system']} | {p['body']} | {p['concurrency']} | {p['throughput_rps']:.1f} "
                f"| {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['throughput_rps'] / limit:.2f} "
                f"| {vs_ray} | {vs_p99} | {_cores(p, 'generator_cores')} "
                f"| {_cores(p, 'server_cores')} | {p['failures']} |"
            )
        lines.append("")
        plots = _plots(rows, docs, model, tokens)
        lines += [f"![{name}]({name})" for name in plots] + [""]
    # sections other benches wrote (generation, hot path, hosts) are kept
    return write_keeping_others(docs / "performance.md", "\n".join(lines))


def _cores(point: dict[str, Any], key: str) -> str:
    value = point.get(key)  # absent from reports written before the suite measured CPU
    return "-" if value is None else f"{value:.2f}"


def best_peer(
    rows: list[dict[str, Any]],
) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Per concurrency, the peer row with the most req/s and the one with the lowest p99."""
    fastest: dict[int, dict[str, Any]] = {}
    steadiest: dict[int, dict[str, Any]] = {}
    for row in rows:
        c = row["concurrency"]
        if c not in fastest or row["throughput_rps"] > fastest[c]["throughput_rps"]:
            fastest[c] = row
        if c not in steadiest or row["p99_ms"] < steadiest[c]["p99_ms"]:
            steadiest[c] = row
    return fastest, steadiest


def _plots(rows: list[dict[str, Any]], docs: Path, model: str, tokens: int) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    for metric, label in (("throughput_rps", "requests/s"), ("p99_ms", "p99 latency (ms)")):
        figure, axes = plt.subplots(figsize=(7, 4))
        for system in sorted({p["system"] for p in rows}):
            series = sorted(
                (p["concurrency"], p[metric])
                for p in rows
                if p["system"] == system and p["body"] != "json"
            )
            if len(series) > 1:
                axes.plot(*zip(*series, strict=True), marker="o", label=system)
        axes.set_xlabel("concurrency")
        axes.set_ylabel(label)
        axes.set_xscale("log", base=2)
        axes.set_title(f"{model}, {tokens} tokens")
        if axes.get_lines():
            axes.legend(fontsize=7)
        figure.tight_layout()
        name = f"perf-{model}-{tokens}-{metric.split('_')[0]}.png"
        figure.savefig(docs / name, dpi=100)
        plt.close(figure)
        names.append(name)
    return names
