"""Sample inputs for a model's ONNX inputs: realistic sizes, token ids within the vocabulary,
attention masks with padding, so the cut and its verification see the shapes traffic brings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporter.converted import DEFAULT_SIZES, DEFAULT_VOCAB, _load_graph
from exporter.errors import ExportError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- sample inputs


def sample_inputs_for(
    model: onnx.ModelProto | Path,
    sizes: list[tuple[int, int]] = DEFAULT_SIZES,
    vocab: int | None = None,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """One feed per (batch, sequence) size for the ONNX graph inputs; fixed dims are kept.

    Token ids lie in [0, vocab) (vocab, else the rows of the embedding the input indexes, else
    100); attention masks pad the last 2 positions of row 1; float inputs are N(0, 1).
    """
    proto = model if isinstance(model, onnx.ModelProto) else _load_graph(Path(model))
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    rng = np.random.default_rng(seed)
    samples = []
    for batch, sequence in sizes:
        if batch < 1 or sequence < 1:
            raise ExportError(f"sample size ({batch}, {sequence}) must be positive")
        named: dict[str, int] = {}  # one size per symbolic dim name within a sample
        feeds = {}
        for value in inputs:
            elem, shape = _input_shape(value, batch, sequence, named)
            high = vocab or _gather_rows(graph, value.name) or DEFAULT_VOCAB
            feeds[value.name] = _sample_value(value.name, elem, shape, high, rng)
        samples.append(feeds)
    return samples


def _input_shape(
    value: onnx.ValueInfoProto, batch: int, sequence: int, named: dict[str, int]
) -> tuple[int, tuple[int, ...]]:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
        raise ExportError(
            f"cannot make a sample for input {value.name!r}: only tensor inputs of known rank "
            "are accepted"
        )
    shape = []
    for axis, dim in enumerate(tensor.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
            continue
        key = dim.dim_param
        if key and key in named:
            shape.append(named[key])
            continue
        size = _guess_size(key, axis, batch, sequence)
        if key:
            named[key] = size
        shape.append(size)
    return tensor.elem_type, tuple(shape)


def _guess_size(dim_name: str, axis: int, batch: int, sequence: int) -> int:
    lowered = dim_name.lower()
    if "batch" in lowered:
        return batch
    if any(word in lowered for word in ("seq", "len", "token")):
        return sequence
    return batch if axis == 0 else sequence


def _gather_rows(graph: onnx.GraphProto, name: str) -> int | None:
    """Rows of the embedding table that ``name`` indexes directly, if any (its vocab size)."""
    tables = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
            table = tables.get(node.input[0])
            if table is not None and table.dims:
                return int(table.dims[0])
    return None


def _sample_value(
    name: str, elem: int, shape: tuple[int, ...], high: int, rng: np.random.Generator
) -> np.ndarray:
    if elem in (TensorProto.STRING, TensorProto.UNDEFINED, TensorProto.BFLOAT16):
        raise ExportError(
            f"cannot make a sample for input {name!r} of ONNX type "
            f"{TensorProto.DataType.Name(elem)}; accepted: bool, integer and float16/32/64"
        )
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    lowered = name.lower()
    if dtype == np.bool_:
        return np.ones(shape, dtype=np.bool_)
    if np.issubdtype(dtype, np.integer):
        if "attention_mask" in lowered:
            return _padded_mask(shape, dtype)
        if "token_type_ids" in lowered:
            return np.zeros(shape, dtype=dtype)
        if "position_ids" in lowered and shape:
            return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        high = min(high, int(np.iinfo(dtype).max) + 1)
        return rng.integers(0, high, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    raise ExportError(f"cannot make a sample for input {name!r} of numpy type {dtype}")


def _padded_mask(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    mask = np.ones(shape, dtype=dtype)
    # right padding in row 1 exercises the masked path; one real token stays
    if len(shape) >= 2 and shape[0] > 1 and shape[-1] > 1:
        mask[1, ..., -min(2, shape[-1] - 1) :] = 0
    return mask
