"""Types and shapes of the tensors a cut hands over: ONNX shape inference, then a real run.

Shape inference leaves some tensors untyped (a Loop's outputs, custom ops). A segment's inputs and
outputs must be typed, so those few are typed from one onnxruntime run of the whole model on a
sample, with every dim kept symbolic (the sample's sizes say nothing about which dims vary).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from exporter.errors import ExportError
from runtime.session import GraphOptimization, ModelSession, SessionSettings, create_session

log = logging.getLogger(__name__)

EXTERNAL_DATA = "folded.onnx.data"


def cpu_settings(optimization: GraphOptimization = "all", threads: int = 0) -> SessionSettings:
    """The exporter's sessions: the CPU, whatever GPU there is (results must compare with the
    CPU reference), spinning off as for nodes."""
    return SessionSettings(device="cpu", intra_op_threads=threads, graph_optimization=optimization)


def _session(
    probe: onnx.ModelProto, folder: Path | None, optimization: GraphOptimization = "all"
) -> ModelSession:
    """A session of ``probe``; with ``folder``, the probe is a graph whose weights lie in an
    external data file there, and only the session (not a serialised copy) holds them."""
    if folder is None:
        return create_session(probe.SerializeToString(), cpu_settings(optimization))
    path = folder / f"probe-{uuid.uuid4().hex[:8]}.onnx"
    onnx.save_model(probe, str(path))
    try:
        return create_session(path, cpu_settings(optimization))
    finally:
        path.unlink(missing_ok=True)


def _probe_session(model: onnx.ModelProto, outputs: list[str], folder: Path | None) -> ModelSession:
    """A session of ``model`` that also returns ``outputs`` (inner tensors)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs if n not in existing)
    # keep every tensor as the graph makes it: fusions would rename or drop the ones asked for
    return _session(probe, folder, "disable")


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred value_info; the model unchanged where inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        log.warning("ONNX shape inference failed (%s); untyped tensors get typed by a run", exc)
        return model


def untyped(model: onnx.ModelProto, names: list[str]) -> list[str]:
    graph = model.graph
    typed = {
        v.name
        for v in [*graph.input, *graph.value_info, *graph.output]
        if v.type.HasField("tensor_type")
        and v.type.tensor_type.elem_type
        and v.type.tensor_type.HasField("shape")
    }
    return [n for n in names if n not in typed]


def type_by_running(
    model: onnx.ModelProto,
    names: list[str],
    feeds: dict[str, np.ndarray],
    folder: Path | None = None,
) -> onnx.ModelProto:
    """Add value_info for ``names`` from their dtype and rank in one run on ``feeds``."""
    if not names:
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        values = _session(probe, folder).run(feeds, names)
    except Exception as exc:  # onnxruntime's errors are untyped
        raise ExportError(
            f"cannot type tensors {', '.join(names)} by running the model: {exc}"
        ) from exc
    typed = onnx.ModelProto()
    typed.CopyFrom(model)
    kept = [v for v in typed.graph.value_info if v.name not in set(names)]
    del typed.graph.value_info[:]
    typed.graph.value_info.extend(kept)
    for name, value in zip(names, values, strict=True):
        array = np.asarray(value)
        elem = helper.np_dtype_to_tensor_dtype(array.dtype)
        dims = [f"{name}_dim{i}" for i in range(array.ndim)]
        typed.graph.value_info.append(helper.make_tensor_value_info(name, elem, dims))
    log.info("typed %d tensor(s) by running the model: %s", len(names), ", ".join(names))
    return typed


def measure_bytes(
    model: onnx.ModelProto,
    names: list[str],
    feeds: dict[str, np.ndarray],
    folder: Path | None = None,
) -> dict[str, int]:
    """Real sizes of ``names`` in one run on ``feeds``.

    Static estimates fail where shape inference leaves a dim symbolic that is really 1 (a
    [batch, 1, seq, seq] mask counted as four free dims looks larger than the hidden state);
    a run on a realistic sample sees the sizes the cut will really carry.
    """
    inputs = {i.name for i in model.graph.input}
    wanted = [n for n in names if n not in inputs]
    sizes = {n: int(np.asarray(feeds[n]).nbytes) for n in names if n in inputs and n in feeds}
    if not wanted:
        return sizes
    try:
        session = _probe_session(model, wanted, folder)
        values = session.run({k: v for k, v in feeds.items() if k in inputs}, wanted)
    except Exception as exc:  # onnxruntime's errors are untyped
        log.warning("could not measure frontier tensors by a run (%s); using estimates", exc)
        return sizes
    for name, value in zip(wanted, values, strict=True):
        array = np.asarray(value)
        sizes[name] = int(array.nbytes) if array.dtype != object else 8 * array.size
    return sizes


def fold_constants(path: Path, work: Path) -> Path:
    """The model with constant subgraphs folded and identities removed (onnxruntime's basic
    level: standard ONNX ops only, semantics preserved), its weights in ``folded.onnx.data``.

    Exporters leave weights behind Identity nodes (tied embeddings) and Constant chains; unfolded,
    such a weight looks like an activation made early and read late, and would be passed along
    every cut instead of being copied into the segment that reads it. Keeping the weights in an
    external file lets the cutter load the graph alone and each segment its own weights.
    """
    target = work / "folded.onnx"
    try:
        session = create_session(
            path,
            cpu_settings("basic"),
            save_optimized_to=target,
            external_data_name=EXTERNAL_DATA,
        )
        del session
        return target
    except Exception as exc:  # onnxruntime's errors are untyped (ModelLoadError here)
        log.warning("constant folding failed (%s); cutting the graph as exported", exc)
    model = onnx.load(str(path))
    onnx.save_model(
        model, str(target), save_as_external_data=True, location=EXTERNAL_DATA, size_threshold=1024
    )
    return target


def pin_observed_dims(
    model: onnx.ModelProto,
    names: list[str],
    samples: list[dict[str, np.ndarray]],
    folder: Path | None = None,
) -> onnx.ModelProto:
    """Type the tensors a cut hands over from runs on every sample: a dim that has the same
    size in all of them (the 1 of a [batch, 1, 1, seq] mask, a hidden size) is fixed, the
    others stay variable.

    Shape inference often leaves such dims symbolic; a span's signature would then accept any
    size there, and the node's warm-up (zeros of size 16 in every variable dim) would feed a
    mask of the wrong shape.
    """
    graph_inputs = {i.name for i in model.graph.input}
    wanted = [n for n in names if n not in graph_inputs]
    if not wanted or not samples:
        return model
    try:
        session = _probe_session(model, wanted, folder)
        runs = [
            session.run({k: v for k, v in s.items() if k in graph_inputs}, wanted) for s in samples
        ]
    except Exception as exc:  # onnxruntime's errors are untyped
        log.warning("could not observe the shapes of cut tensors (%s); keeping inferred ones", exc)
        return model
    shapes = {name: [np.asarray(r[i]).shape for r in runs] for i, name in enumerate(wanted)}
    dtypes = {name: np.asarray(runs[0][i]).dtype for i, name in enumerate(wanted)}
    typed = onnx.ModelProto()
    typed.CopyFrom(model)
    previous = {v.name: v for v in typed.graph.value_info}
    kept = [v for v in typed.graph.value_info if v.name not in shapes]
    del typed.graph.value_info[:]
    typed.graph.value_info.extend(kept)
    for name, seen in shapes.items():
        if len({len(s) for s in seen}) != 1:
            continue  # rank changes between samples: leave it to inference
        old = previous.get(name)
        old_dims = list(old.type.tensor_type.shape.dim) if old is not None else []
        dims: list[int | str] = []
        for axis, sizes in enumerate(zip(*seen, strict=True)):
            if len(set(sizes)) == 1 and len(samples) > 1:
                dims.append(int(sizes[0]))
            elif axis < len(old_dims) and old_dims[axis].dim_param:
                dims.append(old_dims[axis].dim_param)
            else:
                dims.append(f"{name}_dim{axis}")
        elem = helper.np_dtype_to_tensor_dtype(dtypes[name])
        typed.graph.value_info.append(helper.make_tensor_value_info(name, elem, dims))
    return typed
