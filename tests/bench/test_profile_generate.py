"""bench/profile_generate.py's arithmetic on py-spy files and figures made up here: how samples
split between onnxruntime, waiting and Python, and the price of an extra span. Nothing is timed."""

from __future__ import annotations

from pathlib import Path

from bench.profile_generate import split, summarise, table


def _raw(path: Path, lines: dict[str, int]) -> Path:
    path.write_text("".join(f"{stack} {n}\n" for stack, n in lines.items()))
    return path


def test_samples_split_by_the_frame_on_top(tmp_path: Path) -> None:
    raw = _raw(tmp_path / "node.txt", {
        "main (a.py:1);run (onnxruntime_inference_collection.py:406);"
        "Session.run (onnxruntime_inference_collection.py:406)": 60,
        "main (a.py:1);EpollSelector.select (selectors.py:468)": 10,
        "main (a.py:1);decode (codec.py:10)": 20,
        "main (a.py:1);Session.run (x.py:2);handle (web_protocol.py:3)": 10,  # not on top
    })  # fmt: skip
    assert split(raw) == {"onnxruntime": 60.0, "select": 10.0, "python": 30.0}


def _round(tok_s: float, **python_ms: float) -> dict:
    return {"aggregate_tok_s": tok_s, "processes": {
        name: {"cpu_ms_per_token": 2 * ms, "python_ms_per_token": ms, "onnxruntime": 50.0,
               "python": 50.0, "top": []}
        for name, ms in python_ms.items()}}  # fmt: skip


def test_an_extra_span_is_half_the_python_three_spans_add_over_one() -> None:
    summary = summarise({
        "S1": [_round(100, coordinator=0.2, n0=0.4), _round(90, coordinator=0.4, n0=0.6)],
        "S3": [_round(60, coordinator=0.5, n0=0.4, n1=0.4, n2=0.5)] * 2,
    })  # fmt: skip
    assert summary["S1"]["aggregate_tok_s"] == 95
    assert summary["S1"]["python_ms_per_token"] == 0.8  # medians 0.3 + 0.5
    assert summary["S3"]["python_ms_per_token"] == 1.8
    assert summary["extra_span_python_ms_per_token"] == 0.5
    text = table(summary)
    assert "| S3 (60.0 tok/s) | n2 | 1.000 | 50.0 | 50.0 | 0.5 |" in text
    assert "(S3 - S1) / 2: 0.500 ms" in text
