"""write_package: manifest contents, digest, atomic writes, refusal and forced replacement."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.errors import ExportError, PackageExists
from exporter.package_writer import write_package
from runtime.manifest import file_sha256, package_digest, read_manifest, segment_hash


def _linear(name: str, inp: str, out: str, width: int, seed: int, in_type: int) -> onnx.ModelProto:
    """A segment ``out = Cast(inp) @ W`` with W [width, width] fp32 (4 KB at width 32)."""
    w = np.random.default_rng(seed).standard_normal((width, width)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", [inp], [f"{name}.cast"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", [f"{name}.cast", f"{name}.w"], [out]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(inp, in_type, ["batch", width])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(w, f"{name}.w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _chain(width: int = 32) -> list[onnx.ModelProto]:
    return [
        _linear("s0", "x", "h0", width, 0, TensorProto.INT64),
        _linear("s1", "h0", "h1", width, 1, TensorProto.FLOAT),
        _linear("s2", "h1", "y", width, 2, TensorProto.FLOAT),
    ]


def _leftovers(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir()) if model_dir.exists() else []


def test_manifest_reads_back(tmp_path: Path) -> None:
    segments = _chain()
    folder = write_package(
        tmp_path,
        "lin",
        3,
        segments,
        source="test:chain",
        default_stages=[[0, 1], [2, 2]],
        verification={"atol": 1e-4},
    )
    assert folder == tmp_path / "lin" / "3"
    m = read_manifest(folder)
    assert (m.name, m.version, m.opset, m.source) == ("lin", 3, 17, "test:chain")
    assert [(t.name, t.datatype, t.shape) for t in m.inputs] == [("x", "INT64", [-1, 32])]
    assert [(t.name, t.datatype, t.shape) for t in m.outputs] == [("y", "FP32", [-1, 32])]
    assert [s.file for s in m.segments] == ["segment-0.onnx", "segment-1.onnx", "segment-2.onnx"]
    assert [(s.inputs, s.outputs) for s in m.segments] == [
        (["x"], ["h0"]),
        (["h0"], ["h1"]),
        (["h1"], ["y"]),
    ]
    assert m.default_stages == [[0, 1], [2, 2]]
    assert m.verification == {"atol": 1e-4}
    for seg in m.segments:
        assert seg.external_data == []
        assert seg.bytes == (folder / seg.file).stat().st_size
    # nothing but the package in the version folder, no temp folder beside it
    assert _leftovers(folder) == sorted(["manifest.json", *[s.file for s in m.segments]])
    assert _leftovers(tmp_path / "lin") == ["3"]


def test_digest_is_package_digest_over_file_hashes(tmp_path: Path) -> None:
    folder = write_package(tmp_path, "lin", 1, _chain(), source="test")
    m = read_manifest(folder)
    hashes = [file_sha256(folder / f"segment-{k}.onnx") for k in range(3)]
    assert [s.sha256 for s in m.segments] == hashes
    assert m.digest == package_digest(hashes)
    assert m.default_stages == [[0, 2]]
    # the digest names the bytes: other weights, other digest
    other = write_package(tmp_path, "lin", 2, _chain(width=16), source="test")
    assert read_manifest(other).digest != m.digest


def test_segments_chain_in_onnxruntime(tmp_path: Path) -> None:
    segments = _chain()
    folder = write_package(tmp_path, "lin", 1, segments, source="test")
    x = np.arange(64, dtype=np.int64).reshape(2, 32) % 5
    feeds: dict[str, np.ndarray] = {"x": x}
    expected: np.ndarray = x.astype(np.float32)
    for k, seg in enumerate(read_manifest(folder).segments):
        session = ort.InferenceSession(str(folder / seg.file), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, feeds)
        feeds = {seg.outputs[0]: out}
        expected = expected @ numpy_helper.to_array(segments[k].graph.initializer[0])
    np.testing.assert_allclose(feeds["y"], expected, rtol=1e-5, atol=1e-4)


def test_existing_target_refused_without_force(tmp_path: Path) -> None:
    folder = write_package(tmp_path, "lin", 1, _chain(), source="first")
    with pytest.raises(PackageExists, match="force"):
        write_package(tmp_path, "lin", 1, _chain(width=16), source="second")
    assert read_manifest(folder).source == "first"
    assert _leftovers(tmp_path / "lin") == ["1"]


def test_existing_target_replaced_with_force(tmp_path: Path) -> None:
    write_package(tmp_path, "lin", 1, _chain(), source="first")
    folder = write_package(tmp_path, "lin", 1, _chain()[:1], source="second", force=True)
    m = read_manifest(folder)
    assert m.source == "second"
    assert len(m.segments) == 1
    # the old package's extra segments are gone, and so is the old folder set aside
    assert _leftovers(folder) == ["manifest.json", "segment-0.onnx"]
    assert _leftovers(tmp_path / "lin") == ["1"]


def test_failed_rename_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: object, dst: object) -> None:
        raise OSError("disk said no")

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(OSError, match="disk said no"):
        write_package(tmp_path, "lin", 1, _chain(), source="test")
    assert _leftovers(tmp_path / "lin") == []


def test_failure_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync_then_fail(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # after segment-0 is on disk, while segment-1 is written
            raise OSError("I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_then_fail)
    with pytest.raises(OSError, match="I/O error"):
        write_package(tmp_path, "lin", 1, _chain(), source="test")
    assert _leftovers(tmp_path / "lin") == []


def test_failed_forced_replace_keeps_old_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_package(tmp_path, "lin", 1, _chain(), source="first")
    real_rename = os.rename

    def fail_second(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src).name.startswith(".tmp-"):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_second)
    with pytest.raises(OSError, match="rename failed"):
        write_package(tmp_path, "lin", 1, _chain(width=16), source="second", force=True)
    assert read_manifest(folder).source == "first"
    assert _leftovers(tmp_path / "lin") == ["1"]


def test_unserialisable_segment_leaves_nothing(tmp_path: Path) -> None:
    # a graph output with an element type the v2 protocol cannot carry is refused up front
    bad = _chain()
    bad[-1].graph.output[0].type.tensor_type.elem_type = TensorProto.COMPLEX64
    with pytest.raises(ExportError, match="COMPLEX64"):
        write_package(tmp_path, "lin", 1, bad, source="test")
    assert _leftovers(tmp_path / "lin") == []


def test_external_data_segment(tmp_path: Path) -> None:
    segments = _chain()
    before = [s.SerializeToString() for s in segments]
    # a threshold of 0 takes the >2 GB path without writing 2 GB
    folder = write_package(tmp_path, "big", 1, segments, source="test", external_data_threshold=0)
    assert [s.SerializeToString() for s in segments] == before  # caller's protos untouched
    m = read_manifest(folder)
    for k, seg in enumerate(m.segments):
        data = f"segment-{k}.onnx.data"
        assert seg.external_data == [data]
        assert seg.bytes == (folder / seg.file).stat().st_size + (folder / data).stat().st_size
        assert seg.sha256 == segment_hash(folder, seg.file, [data])
        assert seg.sha256 != file_sha256(folder / seg.file)
    assert m.digest == package_digest([s.sha256 for s in m.segments])
    # onnxruntime resolves the weights relative to the segment file
    session = ort.InferenceSession(
        str(folder / "segment-1.onnx"), providers=["CPUExecutionProvider"]
    )
    h0 = np.ones((1, 32), dtype=np.float32)
    (out,) = session.run(None, {"h0": h0})
    expected = h0 @ numpy_helper.to_array(segments[1].graph.initializer[0])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "stages", [[], [[0, 1]], [[1, 2]], [[0, 1], [1, 2]], [[0, 2], [3, 3]], [[0, 0], [2, 2]]]
)
def test_bad_default_stages_refused(tmp_path: Path, stages: list[list[int]]) -> None:
    with pytest.raises(ExportError, match="default_stages"):
        write_package(tmp_path, "lin", 1, _chain(), source="test", default_stages=stages)
    assert _leftovers(tmp_path / "lin") == []


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", ".."])
def test_bad_names_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ExportError, match="name"):
        write_package(tmp_path, name, 1, _chain(), source="test")


def test_no_segments_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="at least one segment"):
        write_package(tmp_path, "lin", 1, [], source="test")
