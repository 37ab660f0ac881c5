"""Tiny ONNX models built in the tests with onnx.helper, and helpers to put them in a repo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17

V2_TO_ONNX = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def all_types_model(width: int = 3) -> onnx.ModelProto:
    """One Identity per v2 datatype: in_{T} [batch, width] -> out_{T}."""
    nodes, inputs, outputs = [], [], []
    for name, elem in V2_TO_ONNX.items():
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["batch", width]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["batch", width]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    return _model(helper.make_graph(nodes, "all_types", inputs, outputs))


def dense_model(features: int = 4, units: int = 3, seed: int = 0) -> onnx.ModelProto:
    """y = relu(x @ W + b) and s = sum over units: x FP32 [batch, features]."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.normal(size=(features, units)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.normal(size=(units,)).astype(np.float32), "b")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["y"]),
        helper.make_node("ReduceSum", ["y", "axes"], ["s"], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", units]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 1]),
        ],
        [weight, bias, axes],
    )
    return _model(graph)


def sequence_model(hidden: int = 8, vocab: int = 50, seed: int = 0) -> onnx.ModelProto:
    """Gather embeddings of token ids [batch, sequence] -> [batch, sequence, hidden], scaled."""
    rng = np.random.default_rng(seed)
    table = numpy_helper.from_array(rng.normal(size=(vocab, hidden)).astype(np.float32), "table")
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Mul", ["emb", "two"], ["hidden"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sequence",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        [table, two],
    )
    return _model(graph)


def fixed_batch_model() -> onnx.ModelProto:
    """No dynamic batch dim: x FP32 [2, 3] -> y = x * 3; must run unbatched."""
    three = numpy_helper.from_array(np.array(3.0, dtype=np.float32), "three")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "three"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [three],
    )
    return _model(graph)


def put_model(repo: Path, name: str, model: onnx.ModelProto, version: int = 1) -> Path:
    """Write a plain model.onnx package: {repo}/{name}/{version}/model.onnx."""
    folder = repo / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "model.onnx"))
    return folder


def dense_segments(
    features: int = 4, hidden: int = 6, units: int = 3, seed: int = 0
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Two segments of one model: x [batch, features] -> h = relu(x @ A) -> y = h @ B."""
    rng = np.random.default_rng(seed)
    a = numpy_helper.from_array(rng.normal(size=(features, hidden)).astype(np.float32), "A")
    b = numpy_helper.from_array(rng.normal(size=(hidden, units)).astype(np.float32), "B")
    first = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["xa"]), helper.make_node("Relu", ["xa"], ["h"])],
        "first",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", hidden])],
        [a],
    )
    second = helper.make_graph(
        [helper.make_node("MatMul", ["h", "B"], ["y"])],
        "second",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", units])],
        [b],
    )
    return _model(first), _model(second)


def dense_reference(x: np.ndarray, features: int = 4, hidden: int = 6, units: int = 3,
                    seed: int = 0) -> np.ndarray:  # fmt: skip
    """What the two ``dense_segments`` compute together, in numpy."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(features, hidden)).astype(np.float32)
    b = rng.normal(size=(hidden, units)).astype(np.float32)
    return np.maximum(x @ a, 0) @ b
