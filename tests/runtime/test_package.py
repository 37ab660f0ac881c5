"""Model packages on disk: repository listing, spans of segments, sha256 checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.package_writer import write_package
from runtime.errors import ModelLoadError, ModelNotFound
from runtime.package import list_repository, load_span, open_package
from runtime.session import SessionSettings
from tests.models import dense_model, put_model

CPU = SessionSettings(device="cpu", intra_op_threads=1)


def _segment(name: str, src: str, dst: str, scale: float) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{name}.scale")
    graph = helper.make_graph(
        [
            helper.make_node("Mul", [src, f"{name}.scale"], [f"{name}.m"]),
            helper.make_node("Relu", [f"{name}.m"], [dst]),
        ],
        name,
        [helper.make_tensor_value_info(src, TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(dst, TensorProto.FLOAT, ["batch", 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _three_segments(repo: Path) -> Path:
    segments = [
        _segment("s0", "x", "h0", 2.0),
        _segment("s1", "h0", "h1", -1.0),
        _segment("s2", "h1", "y", 3.0),
    ]
    return write_package(repo, "chain", 1, segments, source="test")


def test_repository_lists_models_with_manifest_or_model_onnx(tmp_path: Path) -> None:
    put_model(tmp_path, "a", dense_model(), version=1)
    put_model(tmp_path, "a", dense_model(), version=3)
    _three_segments(tmp_path)
    (tmp_path / "empty" / "1").mkdir(parents=True)
    assert list_repository(tmp_path) == {"a": [1, 3], "chain": [1]}
    assert open_package(tmp_path, "a").version == 3
    with pytest.raises(ModelNotFound, match="versions: 1, 3"):
        open_package(tmp_path, "a", 2)
    with pytest.raises(ModelNotFound, match="holds a, chain"):
        open_package(tmp_path, "nope")


def test_a_span_of_segments_equals_the_chain_and_sub_spans_compose(tmp_path: Path) -> None:
    _three_segments(tmp_path)
    package = open_package(tmp_path, "chain")
    x = np.array([[1.0, -2.0, 3.0, -4.0]], np.float32)
    whole = load_span(package, CPU)
    assert [s.name for s in whole.signature.inputs] == ["x"]
    y = whole.run({"x": x})["y"]
    np.testing.assert_array_equal(y, np.maximum(-np.maximum(2 * x, 0), 0) * 3)
    head = load_span(package, CPU, 0, 1)
    tail = load_span(package, CPU, 2, 2)
    np.testing.assert_array_equal(tail.run({"h1": head.run({"x": x})["h1"]})["y"], y)
    with pytest.raises(ModelLoadError, match="outside"):
        load_span(package, CPU, 2, 3)


def test_a_segment_whose_bytes_differ_from_the_manifest_is_refused(tmp_path: Path) -> None:
    folder = _three_segments(tmp_path)
    onnx.save_model(_segment("s1", "h0", "h1", 5.0), str(folder / "segment-1.onnx"))
    package = open_package(tmp_path, "chain")
    load_span(package, CPU, 0, 0)  # untouched segments still load
    with pytest.raises(ModelLoadError, match="segment-1.onnx: sha256 .* does not match"):
        load_span(package, CPU)


def test_a_plain_model_gets_a_digest_that_changes_with_its_bytes(tmp_path: Path) -> None:
    put_model(tmp_path, "m", dense_model(seed=0))
    first = open_package(tmp_path, "m").digest
    put_model(tmp_path, "m", dense_model(seed=1))
    assert first.startswith("sha256:") and open_package(tmp_path, "m").digest != first
