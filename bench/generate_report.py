"""bench/generate.py's figures side by side: the summary (span costs, ratios), the table, the
plot."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from bench.generate_common import common_prefix

ONE_SEQUENCE_NOTE = "llama.cpp: llama-cpp-python's Llama runs one sequence at a time"


def _row(report: dict[str, Any], name: str, tokens: int) -> dict[str, Any] | None:
    side = report["sides"].get(name)
    if side is None or side["skipped"]:
        return None
    result: dict[str, Any] | None = side["results"].get(str(tokens))
    return result if result and result.get("decode_tok_s") else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summary(report: dict[str, Any], tokens: dict[str, dict[int, list[int]]]) -> dict[str, Any]:
    """Per-token cost of each extra span, three spans / limit, appliance / PyTorch, the load
    generator's CPU, and how many leading tokens each side shares with the limit's answer."""
    out: dict[str, Any] = {
        "span_cost_ms_per_token": {},
        "ratios": {},
        "load_generator": {},
        "agreement": {},
    }
    lengths = [p["tokens"] for p in report["prompts"]]
    for n in lengths:
        key = f"prompt_{n}"
        costs: dict[str, Any] = {}
        for precision in ("fp32", "int4"):
            one = _row(report, f"runtime-1span-{precision}", n)
            three = _row(report, f"runtime-3span-{precision}", n)
            if one and three:
                costs[f"runtime_{precision}_3_vs_1_spans"] = {
                    "decode_ms": round((three["ms_per_token"] - one["ms_per_token"]) / 2, 3),
                    "ttft_ms": round((three["ttft_ms"] - one["ttft_ms"]) / 2, 1),
                }
            served = {k: _row(report, f"serve-{k}node-{precision}", n) for k in (1, 2, 3)}
            steps = {}
            for k in (2, 3):
                now, before = served[k], served[k - 1]
                if now and before:
                    steps[f"{k - 1}_to_{k}"] = round(
                        now["ms_per_token"] - before["ms_per_token"], 3
                    )
            if served[1] and served[3]:
                steps["mean_1_to_3"] = round(
                    (served[3]["ms_per_token"] - served[1]["ms_per_token"]) / 2, 3
                )
            if steps:
                costs[f"serve_{precision}"] = steps
        out["span_cost_ms_per_token"][key] = costs
        limit, torch = _row(report, "limit", n), _row(report, "pytorch", n)
        ratios: dict[str, Any] = {}
        for name in (
            "runtime-3span-fp32",
            "runtime-3span-int4",
            "serve-3node-fp32",
            "serve-3node-int4",
        ):
            row = _row(report, name, n)
            if row and limit:
                ratios[f"{name}_over_limit"] = {
                    "decode": _ratio(row["decode_tok_s"], limit["decode_tok_s"]),
                    "ttft": _ratio(row["ttft_ms"], limit["ttft_ms"]),
                }
        for name in (
            "runtime-1span-fp32",
            "runtime-3span-fp32",
            "serve-1node-fp32",
            "serve-3node-fp32",
            "runtime-1span-int4",
            "serve-1node-int4",
            "limit",
        ):
            row = _row(report, name, n)
            if row and torch:
                ratios[f"{name}_over_pytorch"] = {
                    "decode": _ratio(row["decode_tok_s"], torch["decode_tok_s"]),
                    "ttft": _ratio(row["ttft_ms"], torch["ttft_ms"]),
                }
        out["ratios"][key] = ratios
        load: dict[str, Any] = {}
        for name, side in report["sides"].items():
            row = _row(report, name, n)
            if side["side"] == "c" and row and "load_generator_cpu_pct" in row:
                server = [r.get("server_cpu_s") for r in row["per_round"]]
                load[name] = {
                    "client_cpu_pct_of_one_core": row["load_generator_cpu_pct"],
                    "server_cpu_s_per_round": server,
                }
        if load:
            out["load_generator"][key] = load
        reference = tokens.get("limit", {}).get(n) or tokens.get("pytorch", {}).get(n)
        if reference:
            out["agreement"][key] = {
                name: f"{common_prefix(reference, ids[n])}/{len(ids[n])}"
                for name, ids in tokens.items()
                if ids.get(n)
            }
    out["notes"] = [
        ONE_SEQUENCE_NOTE,
        "appliance serve gives each local node cores // nodes onnxruntime threads (at least 1): "
        "on 2 cores, 3 nodes run 1+1+1 threads",
        "agreement: leading greedy tokens shared with the limit's (fp32) answer, first round",
    ]
    return out


def table(report: dict[str, Any]) -> str:
    lengths = [p["tokens"] for p in report["prompts"]]
    settings = report["settings"]
    lines = [
        "",
        f"SmolLM2-135M, one stream, {settings['new_tokens']} new tokens (EOS ignored), greedy, "
        f"{settings['threads']} threads a side, median of {settings['rounds']} alternating "
        f"round(s); load {report['machine']['before']['loadavg']} before, "
        f"{report['machine']['after']['loadavg']} after",
        f"{'side':<44}{'prec':>6}{'prompt':>8}{'TTFT ms':>10}{'tok/s':>8}{'ms/tok':>8}"
        f"{'x limit':>9}{'x torch':>9}{'client CPU':>12}",
    ]
    for n in lengths:
        limit, torch = _row(report, "limit", n), _row(report, "pytorch", n)
        for name, side in report["sides"].items():
            if side["skipped"]:
                continue
            row = _row(report, name, n)
            if row is None:
                continue
            x_limit = _ratio(row["decode_tok_s"], limit["decode_tok_s"]) if limit else None
            x_torch = _ratio(row["decode_tok_s"], torch["decode_tok_s"]) if torch else None
            cpu = row.get("load_generator_cpu_pct")
            lines.append(
                f"{side['label']:<44}{side['precision']:>6}{n:>8}{row['ttft_ms']:>10.1f}"
                f"{row['decode_tok_s']:>8.1f}{row['ms_per_token']:>8.2f}"
                f"{_fmt(x_limit, 'x'):>9}{_fmt(x_torch, 'x'):>9}"
                f"{(f'{cpu:.0f}% core' if cpu is not None else '-'):>12}"
            )
    skipped = [(s["label"], s["precision"], s["skipped"]) for s in report["sides"].values()]
    for label, precision, why in skipped:
        if why:
            lines.append(f"skipped {label} {precision}: {why.splitlines()[0][:160]}")
    summary = report.get("summary", {})
    for key, costs in summary.get("span_cost_ms_per_token", {}).items():
        for what, value in costs.items():
            lines.append(f"extra span, {key}, {what}: {value} (ms per token)")
    for key, ratios in summary.get("ratios", {}).items():
        for what, value in ratios.items():
            lines.append(f"{key}: {what}: decode x{value['decode']}, TTFT x{value['ttft']}")
    for key, loads in summary.get("load_generator", {}).items():
        for name, value in loads.items():
            lines.append(
                f"load generator ({key}, {name}): {value['client_cpu_pct_of_one_core']}% of one "
                f"core, sharing the {report['machine']['cpus']} cores with the servers"
            )
    for key, agree in summary.get("agreement", {}).items():
        lines.append(f"agreement with the limit's tokens, {key}: {agree}")
    lines += [f"note: {note}" for note in summary.get("notes", [])]
    return "\n".join(lines)


def _fmt(value: float | None, suffix: str) -> str:
    return f"{value:.2f}{suffix}" if value is not None else "-"


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """TTFT and decode tokens/s per side, one column per prompt length; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lengths = [p["tokens"] for p in report["prompts"]]
    names = [n for n, s in report["sides"].items() if not s["skipped"]]
    if not names:
        return None
    labels = [f"{report['sides'][n]['label']} {report['sides'][n]['precision']}" for n in names]
    fig, axes = plt.subplots(
        2, len(lengths), figsize=(7 * len(lengths), 1.2 + 0.45 * len(names) * 2), squeeze=False
    )
    for col, n in enumerate(lengths):
        for row, (metric, unit) in enumerate((("ttft_ms", "TTFT ms"), ("decode_tok_s", "tok/s"))):
            ax = axes[row][col]
            values = [(_row(report, name, n) or {}).get(metric, 0) or 0 for name in names]
            ax.barh(range(len(names)), values, color=[_color(report, m) for m in names])
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(labels if col == 0 else [""] * len(names), fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{unit}, {n}-token prompt", fontsize=10)
            for i, v in enumerate(values):
                ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
    fig.suptitle(
        f"SmolLM2-135M, one stream, {report['settings']['new_tokens']} new tokens, "
        f"{report['settings']['threads']} threads, median of {report['settings']['rounds']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _color(report: dict[str, Any], name: str) -> tuple[float, float, float, float]:
    from matplotlib.colors import to_rgba

    side = report["sides"][name]
    palette = {"a": "#444444", "b": "#1f77b4", "c": "#2ca02c", "d": "#d62728", "e": "#9467bd"}
    # int4 in the side's colour, lighter
    return to_rgba(palette.get(side["side"], "#888888"), 0.5 if side["precision"] == "int4" else 1)


def machine_load() -> dict[str, Any]:
    """Load average and other processes busy over one second (the bench wants a quiet box)."""
    import psutil

    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid != me]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(1.0)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct >= 5:
            cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])[:100]
            busy.append({"pid": p.pid, "cpu_pct": round(pct, 1), "cmd": cmd})
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "busy_processes": busy}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for dist in ("onnxruntime", "numpy", "torch", "transformers", "optimum-onnx", "tokenizers"):
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return found
