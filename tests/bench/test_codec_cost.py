"""bench.codec_cost: each piece does the work it is named for, and the figures add up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench import codec_cost
from bench.mlp import IN_FEATURES, OUT_FEATURES


def test_each_piece_does_the_coordinators_work_on_the_same_tensors() -> None:
    work = codec_cost.pieces(rows=3)
    request = work["decode and check the request"]()
    assert request.inputs["input"].shape == (3, IN_FEATURES)
    hop_body, hop_length = work["encode the hop's body"]()
    assert hop_length is not None and len(hop_body) > 3 * IN_FEATURES * 4
    answer = work["decode the node's answer"]()
    assert answer.outputs["output"].shape == (3, OUT_FEATURES)
    reply, reply_length = work["encode the reply"]()
    assert reply_length is not None
    decoded = codec_cost.decode_response(reply, reply_length).outputs["output"]
    np.testing.assert_array_equal(decoded, answer.outputs["output"])


def test_the_report_adds_the_pieces_and_is_written(tmp_path: Path, capsys) -> None:
    out = tmp_path / "codec.json"
    assert codec_cost.main(["--rounds", "2", "--iterations", "20", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    medians = report["median_us"]
    kept = medians.pop("pass-through keeps: parse and rewrite a header")
    assert len(medians) == 4 and all(v > 0 for v in medians.values())
    assert abs(report["codec_today_us"] - sum(medians.values())) < 1e-6
    assert abs(report["pass_through_saves_at_most_us"] - (report["codec_today_us"] - kept)) < 1e-6
    assert all(len(v) == 2 for v in report["per_round_us"].values())
    assert "a pass-through saves at most" in capsys.readouterr().out
