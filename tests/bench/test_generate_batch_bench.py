"""bench/generate_batch.py's peer sides without the real model: the left padding of the
batched limit, its batched IO-bound loop on the tiny decoder graph of test_generate_bench
(every row equal to that row run alone), and the report's ratios and table on figures made up
here. Nothing is timed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.generate_batch import figures
from bench.generate_batch_sides import summarise, table
from bench.generate_limit import BatchLimitRunner, last_logits_variant, left_pad
from tests.bench.test_generate_bench import _plain_greedy, _tiny_decoder


def test_left_pad_right_aligns_prompts_masks_pads_and_counts_positions_per_row() -> None:
    ids, mask, positions = left_pad([[5, 6, 7], [8], [1, 2]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 1, 2]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert ids.dtype == mask.dtype == positions.dtype == np.int64
    for bad in ([], [[1], []]):
        with pytest.raises(ValueError, match="prompt"):
            left_pad(bad, 0)


def test_batched_limit_gives_each_row_the_tokens_it_gets_alone(tmp_path: Path) -> None:
    source = _tiny_decoder(tmp_path / "model.onnx")
    variant = last_logits_variant(source, tmp_path / "model_last_logits.onnx")
    # equal lengths: the tiny graph ignores the mask, so a pad would change its answer
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8, 9, 7, 9]]
    want = [_plain_greedy(source, p, 10)[0] for p in prompts]
    assert len({tuple(w) for w in want}) > 1  # rows differ: a mixed-up row would show
    runner = BatchLimitRunner(variant, threads=1, capacity=16, streams=4)
    started, times, tokens = runner.generate_batch(prompts, 10)
    assert tokens == want
    assert [len(t) for t in times] == [10, 10, 10] and times[0][0] >= started
    assert runner.generate_batch(prompts[1:2], 10)[2] == want[1:2]  # a smaller batch after
    with pytest.raises(ValueError, match="exceed"):
        runner.generate_batch(prompts, 12)
    with pytest.raises(ValueError, match="streams"):
        runner.generate_batch(prompts * 2, 4)


def test_figures_ratios_and_table() -> None:
    # 2 streams of 3 tokens each, started at 0: wall 0.4 s
    got = figures([0.0, 0.0], [[0.1, 0.2, 0.3], [0.2, 0.3, 0.4]])
    assert got["aggregate_tok_s"] == 15.0 and got["tokens"] == 6
    assert got["ttft_p50_ms"] == pytest.approx(150.0) and got["itl_p50_ms"] == 100.0

    def row(tok_s: float) -> dict[str, float]:
        return {"aggregate_tok_s": tok_s, "itl_p50_ms": 50.0, "itl_p99_ms": 90.0,
                "ttft_p50_ms": 120.0, "tokens": 64.0}  # fmt: skip

    results = {
        "limit-inproc-batched": {1: [row(20.0)], 16: [row(100.0), row(120.0), row(80.0)]},
        "limit-optimum-batched": {1: [row(25.0)], 16: [row(50.0)]},
        "llama.cpp-batched": {1: [row(80.0)], 16: [row(200.0)]},
        "serve-1span": {1: [row(10.0)], 16: [row(90.0)]},
        "pytorch-batched": {},  # failed before its first round
    }
    report = summarise(results, 32, 1, 2, {})
    assert report["medians"]["limit-inproc-batched"]["16"]["aggregate_tok_s"] == 100.0
    assert "pytorch-batched" not in report["medians"]
    assert report["ratio_to_limit"]["serve-1span"] == {"1": 0.5, "16": 0.9}
    assert report["ratio_to_optimum_limit"]["serve-1span"]["16"] == 1.8
    assert report["scaling_vs_1_stream"]["serve-1span"]["16"] == 9.0
    assert report["llama_cpp_best_aggregate_tok_s"] == 200.0
    assert report["at_16_streams_over_llama_cpp_best"]["serve-1span"] == 0.45
    report.update(
        sides={"pytorch-batched": {"skipped": "failed in round 1"}},
        loadavg_before=[1.0],
        loadavg_after=[2.0],
    )
    text = table(report)
    assert "(S1) appliance serve, 1 node (1 span)" in text and "0.90" in text and "1.80" in text
    assert "skipped pytorch-batched: failed in round 1" in text
    assert "llama.cpp's best aggregate: 200.0 tok/s (Q4_1 weights)" in text
