"""bench/hotpath_report.py's lever pairs: per-round ratios (not ratios of medians) and the node
lever table, on rounds made up here; and bench/hotpath.py's names for the node levers."""

from __future__ import annotations

import argparse

from bench import hotpath
from bench.hotpath_report import markdown_section, node_lever_table, summarise
from runtime.session import usable_cores


def _point(rows_per_s: float, p50_ms: float) -> dict[str, float]:
    return {"rows_per_s": rows_per_s, "p50_ms": p50_ms}


def _round(base: float, today: float, lever: float, c1: tuple[float, float, float]) -> dict:
    return {
        "in-process onnxruntime, batches of 32": {"32": _point(base, 60), "1": _point(1, c1[0])},
        "a standalone node": {"32": _point(today, 90), "1": _point(1, c1[1])},
        "lever: node x": {"32": _point(lever, 80), "1": _point(1, c1[2])},
    }


def test_pairs_take_the_median_of_per_round_ratios() -> None:
    # round ratios 1.5, 1.0, 2.0 -> median 1.5; the ratio of medians would be 300/200
    rounds = [
        _round(400, 100, 150, (10, 12, 11)),
        _round(400, 300, 300, (10, 13, 12.5)),
        _round(400, 200, 400, (10, 12, 11.5)),
    ]
    summary = summarise(rounds, [("a standalone node", "lever: node x"), ("absent", "x")])
    (pair,) = summary["pairs"]
    assert pair["x_today_c32"] == 1.5
    assert pair["c1_p50_delta_ms"] == -0.5  # medians of -1, -0.5, -0.5
    assert summary["added_latency_c1_p50_ms"]["lever: node x"] == 1.5
    report = {"summary": summary, "node_levers": ["a standalone node", "lever: node x"]}
    table = node_lever_table(report)
    assert table[2].startswith("| a standalone node | 200 | 1.00 |")
    assert table[3].startswith("| node x | 300 | 1.50 |")
    assert "| node x |" in "\n".join(markdown_section(report))


def test_node_lever_names_follow_the_auto_threads_and_each_runs_in_flight() -> None:
    args = argparse.Namespace(runs_in_flight=[2, 3], threads=2, steal_cores=0.1)
    auto = max(1, usable_cores())
    names = hotpath.node_lever_names(args)
    assert names == [
        "a standalone node",
        f"lever: standalone node, intra-op auto ({auto})",
        f"lever: standalone node, intra-op auto ({auto}), 2 runs in flight",
        f"lever: standalone node, intra-op auto ({auto}), 3 runs in flight",
    ]
    pairs = hotpath.lever_pairs(args)
    assert ("a standalone node", names[3]) in pairs and (names[1], names[2]) in pairs
