"""bench/profile.py's docs/profile.md: a new run replaces its own two sections and keeps the
ones other benches wrote (bench.hotpath's levers, bench.profile_generate's generation)."""

from __future__ import annotations

from pathlib import Path

from bench.profile import write_markdown


def _report(rps: float) -> dict[str, object]:
    profile = {"variant": "after", "throughput_rps": rps,
               "cpu_us_per_request": {"coordinator": 400, "node": 4000},
               "top_frames": {"coordinator": [[20.0, "write (x.py:1)"]]}}  # fmt: skip
    ab = {"variant": "after", "flags": [], "throughput_rps": rps, "p50_ms": 80.0,
          "p99_ms": 100.0, "ratio_to_before": 1.0, "rounds_rps": [rps]}  # fmt: skip
    return {"when": "now", "cpus": 2, "model": "demo", "tokens": 16, "threads": 2,
            "concurrency": 32, "profiles": [profile], "ab": [ab]}  # fmt: skip


def test_a_new_run_keeps_the_sections_other_benches_wrote(tmp_path: Path) -> None:
    doc = write_markdown(_report(300.0), tmp_path)
    doc.write_text(doc.read_text() + "\n## Levers measured since (by `bench.hotpath`)\n\nkept\n")
    text = write_markdown(_report(350.0), tmp_path).read_text()
    assert "350.0 req/s while sampled" in text and "300.0 req/s" not in text
    assert text.count("## Where the time goes") == 1
    assert text.count("## Levers measured since") == 1 and "kept" in text
