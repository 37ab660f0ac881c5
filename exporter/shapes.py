"""Types and shapes of the tensors a cut hands over: ONNX shape inference, then a real run.

Shape inference leaves some tensors untyped (a Loop's outputs, custom ops). A segment's inputs and
outputs must be typed, so those few are typed from one onnxruntime run of the whole model on a
sample, with every dim kept symbolic (the sample's sizes say nothing about which dims vary).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from exporter.errors import ExportError

log = logging.getLogger(__name__)


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
    model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]
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
        session = ort.InferenceSession(
            probe.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        values = session.run(names, feeds)
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
