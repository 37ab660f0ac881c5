"""What the partitioner knows of a graph: a topological order, who makes and reads each tensor,
and the bytes of tensors and weights (one sweep over the graph)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from exporter.errors import PartitionError

# Dims that are symbolic or unknown count as this when estimating a frontier's bytes.
SYMBOLIC_DIM = 64
CONTROL_FLOW = {"If", "Loop", "Scan"}


@dataclass
class GraphFacts:
    """What partitioning needs from a graph, computed once."""

    nodes: list[onnx.NodeProto]  # topological order
    inputs: list[str]  # graph inputs that are not initializers
    outputs: list[str]
    node_reads: list[list[str]]  # per node: tensors read, outer-scope reads of subgraphs included
    node_weights: list[set[str]]  # per node: initializers read (in subgraphs too)
    initializer_bytes: dict[str, int]
    producer: dict[str, int]  # tensor -> node index, -1 for a graph input
    last_use: dict[str, int]  # tensor -> last node index that reads it
    value_types: dict[str, onnx.TypeProto]
    tensor_bytes: dict[str, int | None]  # estimated bytes, None when the type is unknown


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scope (not made inside it)."""
    made = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    made |= {t.name for t in graph.sparse_initializer}
    reads: set[str] = set()
    for node in graph.node:
        reads.update(n for n in node.input if n and n not in made)
        for attr in node.attribute:
            for sub in _attribute_graphs(attr):
                reads.update(n for n in _subgraph_reads(sub) if n not in made)
        made.update(node.output)
    reads.update(o.name for o in graph.output if o.name not in made)
    return reads


def _attribute_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _node_reads(node: onnx.NodeProto) -> list[str]:
    reads = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in _attribute_graphs(attr):
            reads.extend(sorted(_subgraph_reads(sub)))
    return list(dict.fromkeys(reads))


def topological_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Kahn's order, stable with respect to the file's order (which is usually topological)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    known |= {t.name for t in graph.sparse_initializer}
    made_by: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for out in node.output:
            if out:
                made_by[out] = index
    waiting = [0] * len(graph.node)
    readers: dict[int, list[int]] = {}
    for index, node in enumerate(graph.node):
        deps = {made_by[n] for n in _node_reads(node) if n in made_by and n not in known}
        deps.discard(index)
        waiting[index] = len(deps)
        for dep in deps:
            readers.setdefault(dep, []).append(index)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    order: list[int] = []
    heapq.heapify(ready)
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for reader in readers.get(index, []):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) != len(graph.node):
        raise PartitionError("the graph has a cycle; a valid ONNX graph is acyclic")
    return [graph.node[i] for i in order]


def _estimate_bytes(type_proto: onnx.TypeProto | None) -> int | None:
    if type_proto is None or not type_proto.HasField("tensor_type"):
        return None
    tensor = type_proto.tensor_type
    if not tensor.elem_type:
        return None
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
    except (KeyError, TypeError):
        itemsize = 8
    if not tensor.HasField("shape"):
        return None
    count = 1
    for dim in tensor.shape.dim:
        count *= dim.dim_value if dim.HasField("dim_value") else SYMBOLIC_DIM
    return count * max(itemsize, 1)


def analyse(model: onnx.ModelProto) -> GraphFacts:
    """Order the graph and gather producers, last uses, weights and tensor types.

    ``model`` should carry inferred shapes (``onnx.shape_inference``); tensors it cannot type
    are estimated as unknown and keep their boundaries from being candidates.
    """
    graph = model.graph
    nodes = topological_order(graph)
    initializer_names = {t.name for t in graph.initializer}
    initializer_names |= {t.values.name for t in graph.sparse_initializer}
    initializer_bytes = {t.name: _initializer_bytes(t) for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializer_names]
    outputs = [o.name for o in graph.output]
    value_types: dict[str, onnx.TypeProto] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.HasField("tensor_type"):
            value_types[value.name] = value.type
    node_reads, node_weights = [], []
    producer: dict[str, int] = {name: -1 for name in inputs}
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        reads = _node_reads(node)
        weights = {n for n in reads if n in initializer_names}
        tensors = [n for n in reads if n not in initializer_names]
        node_reads.append(tensors)
        node_weights.append(weights)
        for name in tensors:
            last_use[name] = index
        for out in node.output:
            if out:
                producer[out] = index
    for name in tensors_without_producer(node_reads, producer):
        raise PartitionError(f"tensor {name!r} is read but neither made nor a graph input")
    tensor_bytes = {name: _estimate_bytes(value_types.get(name)) for name in producer}
    return GraphFacts(
        nodes,
        inputs,
        outputs,
        node_reads,
        node_weights,
        initializer_bytes,
        producer,
        last_use,
        value_types,
        tensor_bytes,
    )


def tensors_without_producer(node_reads: list[list[str]], producer: dict[str, int]) -> list[str]:
    return sorted({n for reads in node_reads for n in reads if n not in producer})


def _initializer_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        for entry in tensor.external_data:
            if entry.key == "length":
                return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError):
        itemsize = 8
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
