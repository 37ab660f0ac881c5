"""bench.handoff_cost: the three ways give the same answer on a real session, and the report
holds every side's figures and the differences it prints."""

from __future__ import annotations

import json
from pathlib import Path

from bench import handoff_cost


def test_the_report_holds_each_side_and_the_differences(tmp_path: Path, capsys) -> None:
    out = tmp_path / "handoff.json"
    args = ["--models", "tiny", "--rounds", "3", "--requests", "30", "--threads", "1"]
    assert handoff_cost.main([*args, "--out", str(out)]) == 0
    tiny = json.loads(out.read_text())["models"]["tiny"]
    assert set(tiny["p50_us"]) == {"inline", "executor", "batcher"}
    assert all(len(v) == 3 and min(v) > 0 for v in tiny["p50_us_per_round"].values())
    assert all(v > 0 for v in tiny["cpu_us_per_request"].values())
    assert set(tiny["added_p50_us"]) == {"executor - inline", "batcher - inline"}
    printed = capsys.readouterr().out
    assert "executor - inline" in printed and "us/request" in printed
