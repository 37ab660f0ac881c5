"""bench/package_ab.py on the tiny Llama: two packages, the same decode steps in each, their
step times and how far their logits are apart (real exports, real sessions; nothing timed is
asserted beyond being measured)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.package_ab import compare, load_whole, main
from tests.support.tiny_llm import export_tiny_generation_package, shared_tiny_package


def test_the_same_package_twice_gives_the_same_logits_at_every_step(tmp_path: Path) -> None:
    repo = shared_tiny_package()
    out = tmp_path / "ab.json"
    main([str(repo), str(repo), "--name", "tiny-llm", "--rows", "1,3", "--steps", "4",
          "--threads", "1", "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert [r["rows"] for r in report["results"]] == [1, 3]
    for result in report["results"]:
        assert result["max_abs_logit_diff"] < 1e-5
        assert result["steps_with_equal_argmax"] == "6/6"  # 4 timed + 2 warm-up steps
        assert all(ms > 0 for ms in result["median_step_ms"].values())
        assert result["after_over_before_speed"] > 0


def test_a_different_export_shows_up_as_a_logit_difference(tmp_path: Path) -> None:
    """int8 weights against fp32: the bench reports how far apart they are, not zero."""
    quantized = tmp_path / "repo"
    export_tiny_generation_package(quantized, stages=2, quantize="int8", force=True)
    spans = {
        "before": load_whole(shared_tiny_package(), "tiny-llm", 1),
        "after": load_whole(quantized, "tiny-llm", 1),
    }
    result = compare(spans, rows=2, steps=3)
    assert result["max_abs_logit_diff"] > 1e-4
    assert result["rows"] == 2 and set(result["tok_s"]) == {"before", "after"}


def test_a_repository_without_the_package_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="tiny-llm"):
        load_whole(tmp_path, "tiny-llm", 1)
