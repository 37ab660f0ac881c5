"""export_model and ``appliance export`` end to end: cut, verify, write, and serve the pieces."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporter.demo_model import build_demo_model
from exporter.errors import ExportError, PackageExists, ReducedPrecisionRejected
from exporter.export import export_model, format_plan, parse_size
from runtime.manifest import read_manifest
from runtime.package import load_span, open_package
from runtime.session import SessionSettings

CPU = SessionSettings(device="cpu", intra_op_threads=1)
SMALL = {"blocks": 4, "hidden": 64, "heads": 4, "ffn": 256, "vocab": 300}


def small_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "small.onnx"
    onnx.save_model(build_demo_model(**SMALL), str(path))
    return path


def appliance(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_an_onnx_file_is_cut_per_block_and_its_spans_compose(tmp_path: Path) -> None:
    result = export_model(
        small_onnx(tmp_path), tmp_path / "repo", "small", stages=2, min_segment_bytes=0
    )
    assert result.folder is not None
    manifest = read_manifest(result.folder)
    # the embedding, then one segment per block (each block splits into two narrow halves
    # when nothing is merged: attention | MLP)
    assert len(manifest.segments) >= 1 + SMALL["blocks"]
    assert manifest.default_stages[0][0] == 0 and len(manifest.default_stages) == 2
    assert manifest.verification["chained_vs_whole"]["max_abs_diff"]["last_hidden_state"] < 1e-5
    package = open_package(tmp_path / "repo", "small")
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 7)).astype(np.int64)
    whole = load_span(package, CPU).run({"input_ids": ids})["last_hidden_state"]
    reference = onnx.load(str(tmp_path / "small.onnx"))
    import onnxruntime as ort

    direct = ort.InferenceSession(reference.SerializeToString()).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(whole, direct, atol=1e-5)
    (a, b), (c, d) = manifest.default_stages
    head = load_span(package, CPU, a, b).run({"input_ids": ids})
    tail = load_span(package, CPU, c, d).run(head)
    np.testing.assert_allclose(tail["last_hidden_state"], whole, atol=1e-6)


def test_small_segments_merge_and_the_plan_prints(tmp_path: Path) -> None:
    source = small_onnx(tmp_path)
    merged = export_model(source, tmp_path / "repo", "m", dry_run=True, min_segment_bytes=10**9)
    assert len(merged.plans) == 1 and merged.folder is None
    assert not (tmp_path / "repo" / "m").exists()
    fine = export_model(source, tmp_path / "repo", "m", dry_run=True, min_segment_bytes=0, stages=3)
    table = format_plan(fine)
    assert "input_ids -> embed.out" in table and "default grouping: [0-" in table


def test_existing_version_is_refused_unless_forced(tmp_path: Path) -> None:
    source = small_onnx(tmp_path)
    first = export_model(source, tmp_path / "repo", "m")
    with pytest.raises(PackageExists, match="--force"):
        export_model(source, tmp_path / "repo", "m")
    again = export_model(source, tmp_path / "repo", "m", force=True)
    assert again.folder == first.folder
    assert read_manifest(again.folder).digest == read_manifest(first.folder).digest  # type: ignore[arg-type]


def test_more_stages_than_segments_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--stages 50 is more than the .* segment"):
        export_model(small_onnx(tmp_path), tmp_path / "repo", "m", stages=50)
    assert not (tmp_path / "repo" / "m" / "1").exists()


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4MiB", 4 * 2**20),
        ("500MB", 500 * 10**6),
        ("1.5GiB", int(1.5 * 2**30)),
        ("800k", 800_000),
        ("1000", 1000),
        ("0", 0),
    ],
)
def test_sizes_parse(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "4XB", "-3MB", "MB", "1e"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ExportError, match="not a size"):
        parse_size(text)


def test_int8_is_held_to_its_own_tolerance_and_written_only_within_it_or_forced(
    tmp_path: Path,
) -> None:
    result = export_model(
        small_onnx(tmp_path), tmp_path / "repo", "q", quantize="int8", reduced_atol=1.0
    )
    report = result.verification
    assert report["precision"] == "int8"
    reduced = report["reduced_vs_whole"]
    error = reduced["max_abs_diff"]["last_hidden_state"]
    assert 1e-4 < error < 1.0 and reduced["atol"] == 1.0 and reduced["accepted"] == "within"
    package = open_package(tmp_path / "repo", "q")
    ops = {
        n.op_type
        for s in package.segments
        for n in onnx.load(str(package.folder / s.file)).graph.node
    }
    assert any("Integer" in op or "Quant" in op for op in ops)
    tight = error / 10
    with pytest.raises(ReducedPrecisionRejected, match="--reduced-atol"):
        export_model(small_onnx(tmp_path), tmp_path / "repo", "t", quantize="int8",
                     reduced_atol=tight)  # fmt: skip
    assert not (tmp_path / "repo" / "t" / "1").exists()  # nothing written
    forced = export_model(small_onnx(tmp_path), tmp_path / "repo", "t", quantize="int8",
                          reduced_atol=tight, force=True)  # fmt: skip
    assert forced.verification["reduced_vs_whole"]["accepted"] == "forced"


def test_the_export_command_prints_the_reduced_error_next_to_its_tolerance(
    tmp_path: Path,
) -> None:
    done = appliance("export", str(small_onnx(tmp_path)), "--model-repo", str(tmp_path / "r"),
                     "--name", "q", "--quantize", "int8", "--reduced-atol", "5")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "verified: chained fp32 segments vs the whole model" in done.stdout
    assert re.search(r"int8: max abs diff vs fp32 \{.*\} \(tolerance --reduced-atol 5: within\)",
                     done.stdout), done.stdout  # fmt: skip
    refused = appliance("export", str(small_onnx(tmp_path)), "--model-repo", str(tmp_path / "r"),
                        "--name", "z", "--quantize", "int8", "--reduced-atol", "1e-9")  # fmt: skip
    assert refused.returncode == 2 and "pass --force to write the package anyway" in refused.stderr


def test_fp16_is_written_with_its_measured_error_or_a_note(tmp_path: Path) -> None:
    result = export_model(small_onnx(tmp_path), tmp_path / "repo", "h", fp16=True)
    report = result.verification
    assert report["precision"] == "fp16"
    assert "reduced_vs_whole" in report or "gpu-marked" in report["note"]


def test_cli_errors_exit_2_with_the_reason(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    missing = appliance("export", "--model-repo", repo, "--name", "m")
    assert missing.returncode == 2 and "SOURCE is missing" in missing.stderr
    (tmp_path / "empty").mkdir()
    not_model = appliance("export", str(tmp_path / "empty"), "--model-repo", repo, "--name", "m")
    assert not_model.returncode == 2 and "config.json" in not_model.stderr
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(os.urandom(2000))
    bad = appliance("export", str(corrupt), "--model-repo", repo, "--name", "m")
    assert bad.returncode == 2 and "corrupt.onnx" in bad.stderr
    size = appliance(
        "export",
        str(small_onnx(tmp_path)),
        "--model-repo",
        repo,
        "--name",
        "m",
        "--min-segment-bytes",
        "big",
    )
    assert size.returncode == 2 and "not a size" in size.stderr
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("*.onnx"))


def test_cli_dry_run_prints_the_plan(tmp_path: Path) -> None:
    done = appliance(
        "export",
        str(small_onnx(tmp_path)),
        "--model-repo",
        str(tmp_path / "r"),
        "--name",
        "m",
        "--dry-run",
        "--min-segment-bytes",
        "0",
        "--stages",
        "2",
    )
    assert done.returncode == 0, done.stderr
    assert "segment" in done.stdout and "default grouping" in done.stdout
    assert not (tmp_path / "r" / "m").exists()


_FILL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from appliance.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_disk_that_fills_while_writing_leaves_no_package(tmp_path: Path) -> None:
    source = small_onnx(tmp_path)
    repo = tmp_path / "repo"
    # big enough for the export's own temp files of one segment, too small for the package
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _FILL_DISK,
            str(50_000),
            "export",
            str(source),
            "--model-repo",
            str(repo),
            "--name",
            "m",
            "--min-segment-bytes",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "File too large" in done.stderr or "No space" in done.stderr
    leftovers = list((repo / "m").iterdir()) if (repo / "m").exists() else []
    assert leftovers == []  # no version folder and no temp folder


def test_the_default_demo_model_is_cut_one_segment_per_block(tmp_path: Path) -> None:
    result = export_model(build_demo_model(), tmp_path, "demo", stages=2)
    assert result.folder is not None
    manifest = read_manifest(result.folder)
    assert len(manifest.segments) == 13  # the embedding, then 12 blocks
    assert manifest.verification["chained_vs_whole"]["max_abs_diff"]["last_hidden_state"] == 0.0


@pytest.mark.gpu
def test_fp16_segments_match_fp32_on_cuda(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with a CUDA device")
    result = export_model(small_onnx(tmp_path), tmp_path / "repo", "h", fp16=True)
    assert result.folder is not None
    package = open_package(tmp_path / "repo", "h")
    gpu = load_span(package, SessionSettings(device="cuda"))
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 9)).astype(np.int64)
    reference = ort.InferenceSession(str(tmp_path / "small.onnx")).run(None, {"input_ids": ids})
    got = gpu.run({"input_ids": ids})["last_hidden_state"]
    np.testing.assert_allclose(got, reference[0], atol=5e-2, rtol=5e-2)
