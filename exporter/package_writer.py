"""Write a model package (docs/design.md, "Model packages") atomically.

Everything is built in a dot-named temp folder beside the target (``{repo}/{name}/.tmp-...``), each
file fsynced, then the folder is renamed onto ``{repo}/{name}/{version}``. A reader therefore sees
either no version folder or a complete one; a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import onnx
from google.protobuf.message import EncodeError
from onnx import TensorProto

from exporter.errors import ExportError, PackageExists
from runtime.errors import UnsupportedDatatype
from runtime.manifest import (
    Manifest,
    SegmentInfo,
    TensorInfo,
    package_digest,
    segment_hash,
    write_manifest,
)

log = logging.getLogger(__name__)

# protobuf cannot serialise a message of 2 GiB or more, so bigger segments keep weights outside
EXTERNAL_DATA_THRESHOLD = 2**31 - 1
# tensors smaller than this stay inline (as onnx.save_model's default size_threshold)
_MIN_EXTERNAL_TENSOR = 1024
# page-aligned offsets let onnxruntime map external weights instead of copying them
_EXTERNAL_ALIGN = 4096

ELEM_TYPE_TO_V2: dict[int, str] = {
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.STRING: "BYTES",
    TensorProto.BFLOAT16: "BF16",
}


def write_package(
    repo: Path,
    name: str,
    version: int,
    segments: list[onnx.ModelProto],
    *,
    source: str,
    default_stages: list[list[int]] | None = None,
    verification: dict[str, Any] | None = None,
    force: bool = False,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Write ``{repo}/{name}/{version}/`` (manifest.json + segment-{k}.onnx) and return it.

    The chain's inputs are the first segment's graph inputs, its outputs the last segment's graph
    outputs. A segment whose serialised size exceeds ``external_data_threshold`` bytes is saved
    with its weights in ``segment-{k}.onnx.data``. Raises PackageExists when the version folder
    exists and ``force`` is false; with ``force`` the old folder is replaced.
    """
    _check_name(name)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ExportError(f"version must be a non-negative integer, got {version!r}")
    if not segments:
        raise ExportError("a package needs at least one segment, got none")
    stages = _check_stages(default_stages, len(segments))
    extra = dict(verification or {})
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"verification must be JSON-serialisable ({exc})") from exc
    # everything derived from the protos is checked before any file is written
    inputs = [_tensor_info(v, "input") for v in _graph_inputs(segments[0].graph)]
    outputs = [_tensor_info(v, "output") for v in segments[-1].graph.output]
    opset = _default_opset(segments[0])

    model_dir = Path(repo) / name
    target = model_dir / str(version)
    if target.exists() and not force:
        raise PackageExists(_exists_message(target))
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{version}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        infos = [
            _write_segment(tmp, k, segment, external_data_threshold)
            for k, segment in enumerate(segments)
        ]
        manifest = Manifest(
            name=name,
            version=version,
            digest=package_digest([info.sha256 for info in infos]),
            opset=opset,
            source=source,
            inputs=inputs,
            outputs=outputs,
            segments=infos,
            default_stages=stages,
            verification=extra,
        )
        write_manifest(tmp, manifest)
        _fsync_dir(tmp)
        _move_into_place(tmp, target, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "wrote package %s (%d segments, %d bytes, %s)",
        target,
        len(infos),
        sum(info.bytes for info in infos),
        manifest.digest,
    )
    return target


def _exists_message(target: Path) -> str:
    return f"{target} exists already; pass force=True to replace it"


def _check_name(name: str) -> None:
    # dot names are reserved for this writer's temp folders; separators would escape the repo
    if not name or name.startswith(".") or "/" in name or "\\" in name or os.sep in name:
        raise ExportError(
            f"model name {name!r} is not valid; use a plain folder name without '/' "
            "that does not start with '.'"
        )


def _check_stages(stages: list[list[int]] | None, count: int) -> list[list[int]]:
    """Default stages must be consecutive [first, last] runs covering segments 0..count-1."""
    if stages is None:
        return [[0, count - 1]]
    expected = 0
    result: list[list[int]] = []
    for stage in stages:
        if len(stage) != 2 or stage[0] != expected or stage[1] < stage[0]:
            break
        result.append([int(stage[0]), int(stage[1])])
        expected = stage[1] + 1
    else:
        if expected == count and result:
            return result
    raise ExportError(
        f"default_stages {stages!r} must be consecutive [first, last] segment ranges "
        f"covering 0..{count - 1} in order, e.g. [[0, {count - 1}]]"
    )


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    # older IRs list initializers among the inputs; those are weights, not inputs of the chain
    weights = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in weights]


def _tensor_info(value: onnx.ValueInfoProto, role: str) -> TensorInfo:
    if not value.type.HasField("tensor_type"):
        raise ExportError(f"{role} {value.name!r} is not a tensor; only tensors can be served")
    tensor_type = value.type.tensor_type
    datatype = ELEM_TYPE_TO_V2.get(tensor_type.elem_type)
    if datatype is None:
        name = TensorProto.DataType.Name(tensor_type.elem_type)
        raise ExportError(
            f"{role} {value.name!r} has element type {name}, which has no v2 datatype; "
            f"accepted: {', '.join(TensorProto.DataType.Name(t) for t in ELEM_TYPE_TO_V2)}"
        )
    if not tensor_type.HasField("shape"):
        raise ExportError(
            f"{role} {value.name!r} has no shape; declare its rank (dim_param for variable dims)"
        )
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    return TensorInfo(name=value.name, datatype=datatype, shape=shape)


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("the first segment imports no default-domain (ai.onnx) opset")


def _write_segment(folder: Path, k: int, model: onnx.ModelProto, threshold: int) -> SegmentInfo:
    file = f"segment-{k}.onnx"
    external: list[str] = []
    try:
        if _serialized_size(model) > threshold:
            data_file = f"{file}.data"
            if _save_with_external_data(model, folder / file, data_file):
                external = [data_file]
        else:
            _write_file(folder / file, model.SerializeToString())
    except EncodeError as exc:
        raise ExportError(f"segment {k} cannot be serialised ({exc})") from exc
    size = sum((folder / f).stat().st_size for f in [file, *external])
    return SegmentInfo(
        file=file,
        bytes=size,
        sha256=segment_hash(folder, file, external),
        inputs=[v.name for v in _graph_inputs(model.graph)],
        outputs=[v.name for v in model.graph.output],
        external_data=external,
        output_row_bytes=_output_row_bytes(model),
    )


def _output_row_bytes(model: onnx.ModelProto) -> int | None:
    """What the segment's outputs weigh per row, if their types are declared."""
    try:
        return sum(_tensor_info(v, "output").row_bytes() for v in model.graph.output)
    except (ExportError, UnsupportedDatatype):
        return None


def _serialized_size(model: onnx.ModelProto) -> int:
    try:
        return int(model.ByteSize())
    except EncodeError:
        # protobuf refuses to even size a message over its 2 GiB limit
        return 2**63 - 1


def _initializers(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _initializers(attr.g)
            for sub in attr.graphs:
                yield from _initializers(sub)


def _save_with_external_data(model: onnx.ModelProto, path: Path, location: str) -> bool:
    """Save ``model`` with its large raw tensors in ``location``; True if any tensor moved.

    Same on-disk format as ``onnx.save_model(save_as_external_data=True)``, but the caller's model
    is restored afterwards (onnx's version strips the weights from the proto it is given).
    """
    data_path = path.parent / location
    moved: list[tuple[TensorProto, bytes, bool]] = []
    try:
        with open(data_path, "wb") as data:
            for tensor in _initializers(model.graph):
                if tensor.data_location == TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
                    continue
                raw = tensor.raw_data
                if len(raw) < _MIN_EXTERNAL_TENSOR:
                    continue
                data.write(b"\0" * (-data.tell() % _EXTERNAL_ALIGN))
                offset = data.tell()
                data.write(raw)
                moved.append((tensor, raw, tensor.HasField("data_location")))
                tensor.ClearField("raw_data")
                for key, value in (
                    ("location", location),
                    ("offset", offset),
                    ("length", len(raw)),
                ):
                    entry = tensor.external_data.add()
                    entry.key = key
                    entry.value = str(value)
                tensor.data_location = TensorProto.EXTERNAL
            _sync(data)
        _write_file(path, model.SerializeToString())
    finally:
        for tensor, raw, had_location in moved:
            del tensor.external_data[:]
            # restore field presence too, so the caller's proto serialises to the same bytes
            if had_location:
                tensor.data_location = TensorProto.DEFAULT
            else:
                tensor.ClearField("data_location")
            tensor.raw_data = raw
    if not moved:
        data_path.unlink()
    return bool(moved)


def _write_file(path: Path, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)
        _sync(handle)


def _sync(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    # makes the directory entries (new files, renames) durable, not only the file contents
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, target: Path, force: bool) -> None:
    model_dir = target.parent
    aside: Path | None = None
    if force and target.exists():
        aside = model_dir / f".old-{target.name}-{secrets.token_hex(4)}"
        os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except OSError as exc:
        if aside is not None:
            os.rename(aside, target)  # put the old package back: never leave the version missing
        elif target.exists():
            raise PackageExists(_exists_message(target)) from exc
        raise
    _fsync_dir(model_dir)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
