"""The built-in demo model: valid ONNX, runs in onnxruntime, deterministic, rows independent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporter.demo_model import (
    build_demo_model,
    ensure_demo_package,
    weight_bytes,
    write_demo_package,
)
from exporter.errors import ExportError
from runtime.manifest import read_manifest

SMALL: dict[str, Any] = {"blocks": 2, "hidden": 64, "heads": 4, "ffn": 128, "vocab": 100}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _ids(batch: int, sequence: int, vocab: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, sequence), dtype=np.int64)


@pytest.fixture(scope="module")
def small() -> onnx.ModelProto:
    return build_demo_model(**SMALL)


def test_small_passes_checker_and_declares_signature(small: onnx.ModelProto) -> None:
    onnx.checker.check_model(small, full_check=True)
    (inp,) = small.graph.input
    (out,) = small.graph.output
    assert inp.name == "input_ids"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert out.name == "last_hidden_state"
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = out.type.tensor_type.shape.dim
    assert [dims[0].dim_param, dims[1].dim_param, dims[2].dim_value] == ["batch", "sequence", 64]
    # block boundaries are single named tensors the cutter can split at
    produced = {o for n in small.graph.node for o in n.output}
    assert {"embed.out", "block0.out", "block1.out"} <= produced
    assert "block1.attn.q.weight" in {t.name for t in small.graph.initializer}


@pytest.mark.parametrize("batch,sequence", [(1, 1), (1, 16), (3, 7), (8, 128)])
def test_small_runs_in_onnxruntime(small: onnx.ModelProto, batch: int, sequence: int) -> None:
    (out,) = _session(small).run(None, {"input_ids": _ids(batch, sequence)})
    assert out.shape == (batch, sequence, 64)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    # the final LayerNorm (scale 1, bias 0) normalises every position
    np.testing.assert_allclose(out.mean(axis=-1), 0.0, atol=1e-4)


def test_build_is_deterministic() -> None:
    first = build_demo_model(**SMALL).SerializeToString()
    assert build_demo_model(**SMALL).SerializeToString() == first
    assert build_demo_model(**SMALL, seed=1).SerializeToString() != first


def test_batch_rows_are_independent(small: onnx.ModelProto) -> None:
    session = _session(small)
    ids = _ids(3, 11, seed=5)
    (batched,) = session.run(None, {"input_ids": ids})
    for i in range(3):
        (alone,) = session.run(None, {"input_ids": ids[i : i + 1]})
        np.testing.assert_allclose(batched[i], alone[0], atol=1e-5, rtol=0)


def test_default_config_weighs_about_100_mb() -> None:
    model = build_demo_model()
    size = weight_bytes(model)
    assert 90_000_000 <= size <= 110_000_000
    (out,) = _session(model).run(None, {"input_ids": _ids(1, 16, vocab=8192)})
    assert out.shape == (1, 16, 384)
    assert np.isfinite(out).all()


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ExportError, match="divisible"):
        build_demo_model(hidden=10, heads=3)


def test_write_and_ensure_demo_package(tmp_path: Path) -> None:
    folder = write_demo_package(tmp_path, **SMALL)
    assert folder == tmp_path / "demo" / "1"
    manifest = read_manifest(folder)
    assert manifest.source == "builtin:demo"
    assert [s.file for s in manifest.segments] == ["segment-0.onnx"]
    assert manifest.default_stages == [[0, 0]]
    mtime = (folder / "segment-0.onnx").stat().st_mtime_ns
    # complete package: returned as is, not rewritten
    assert ensure_demo_package(tmp_path, **SMALL) == folder
    assert (folder / "segment-0.onnx").stat().st_mtime_ns == mtime


def test_ensure_writes_missing_and_repairs_incomplete(tmp_path: Path) -> None:
    folder = ensure_demo_package(tmp_path, name="tiny", **SMALL)
    assert (folder / "manifest.json").is_file()
    digest = read_manifest(folder).digest
    (folder / "segment-0.onnx").unlink()
    assert ensure_demo_package(tmp_path, name="tiny", **SMALL) == folder
    assert read_manifest(folder).digest == digest
    assert (folder / "segment-0.onnx").is_file()
