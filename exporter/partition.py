"""Cutting an ONNX graph into segments at its narrow boundaries (pure functions over the graph).

Positions are between nodes of a topological order: position ``p`` cuts before node ``p``. The
*frontier* at ``p`` is every tensor made before it (or a graph input) that is still needed at or
after it (or is a graph output): exactly what one segment must hand to the next. Side tensors made
early and read late (a mask, rotary tables, a model input read in a later block) are therefore
passed along as extra segment outputs and inputs; large initializers are never in a frontier, they
are copied to each segment that reads them instead.

A boundary is a *candidate* when its frontier is narrow: one hidden state plus side tensors that
together are smaller than it (see ``candidates``).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from exporter.errors import ExportError

# Dims that are symbolic or unknown count as this when estimating a frontier's bytes.
SYMBOLIC_DIM = 64
CONTROL_FLOW = {"If", "Loop", "Scan"}


class PartitionError(ExportError):
    """The graph cannot be cut as asked (a cycle, an untyped frontier tensor, bad grouping)."""


@dataclass(frozen=True)
class Boundary:
    position: int  # cut before this node index (1 .. len(nodes) - 1)
    frontier: tuple[str, ...]  # tensors crossing it, in the order they were made
    frontier_bytes: int  # estimated (symbolic dims counted as SYMBOLIC_DIM) or measured
    largest_bytes: int  # the widest single tensor crossing (the hidden state at a block edge)
    left_bytes: int  # initializer bytes read before the cut
    right_bytes: int  # initializer bytes read at or after it (shared weights count twice)
    shape_values: bool = False  # a small integer tensor made inside the graph crosses it


@dataclass(frozen=True)
class SegmentPlan:
    start: int  # first node index
    stop: int  # one past the last node index
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weight_bytes: int
    initializers: tuple[str, ...]


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


def frontier_at(facts: GraphFacts, position: int) -> tuple[str, ...]:
    """Tensors made before ``position`` and needed at or after it (the definition, directly)."""
    outputs = set(facts.outputs)
    crossing = [
        name
        for name, made in facts.producer.items()
        if made < position and (facts.last_use.get(name, -2) >= position or name in outputs)
    ]
    return tuple(sorted(crossing, key=lambda n: (facts.producer[n], _order_key(facts, n))))


def _order_key(facts: GraphFacts, name: str) -> int:
    made = facts.producer[name]
    if made < 0:
        return facts.inputs.index(name)
    return list(facts.nodes[made].output).index(name)


def boundaries(facts: GraphFacts) -> list[Boundary]:
    """Every interior position with its frontier and the weight bytes on each side.

    One sweep: a tensor enters the frontier after its producer and leaves after its last use.
    """
    count = len(facts.nodes)
    outputs = set(facts.outputs)
    first_user: dict[str, int] = {}
    last_user: dict[str, int] = {}
    for index, weights in enumerate(facts.node_weights):
        for name in weights:
            first_user.setdefault(name, index)
            last_user[name] = index
    # a tensor is in the frontier at positions made+1 .. last use (to the end for graph outputs)
    enter: list[list[str]] = [[] for _ in range(count + 2)]
    leave: list[list[str]] = [[] for _ in range(count + 2)]
    for name, made in facts.producer.items():
        last = facts.last_use.get(name, -2)
        if name in outputs:
            last = count
        if last <= made:
            continue  # never read after it is made (a dead end), never crosses
        enter[made + 1].append(name)
        if last < count:
            leave[last + 1].append(name)
    left_delta = [0] * (count + 2)
    right_delta = [0] * (count + 2)
    for name, first in first_user.items():
        size = facts.initializer_bytes.get(name, 0)
        left_delta[first + 1] += size  # on the left of every position after its first reader
        right_delta[last_user[name] + 1] -= size
    total = sum(facts.initializer_bytes.get(n, 0) for n in first_user)
    result: list[Boundary] = []
    live: dict[str, None] = {}
    left = 0
    right = total
    for position in range(0, count):
        for name in leave[position]:
            live.pop(name, None)
        for name in enter[position]:
            live[name] = None
        left += left_delta[position]
        right += right_delta[position]
        if position == 0:
            continue
        frontier = tuple(sorted(live, key=lambda n: (facts.producer[n], _order_key(facts, n))))
        known = [facts.tensor_bytes.get(n) for n in frontier]
        unknown = any(b is None for b in known)
        width = -1 if unknown else sum(b or 0 for b in known)
        largest = -1 if unknown else max((b or 0 for b in known), default=0)
        shapes = any(_is_shape_value(facts, n) for n in frontier)
        result.append(Boundary(position, frontier, width, largest, left, right, shapes))
    return result


_INTEGER_TYPES = {
    onnx.TensorProto.INT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64,
}


def _is_shape_value(facts: GraphFacts, name: str) -> bool:
    """A few integers computed in the graph (a length, a shape): the next segment would depend
    on their values, which a node cannot make up to warm a span, nor check against a signature."""
    if facts.producer.get(name, -1) < 0:
        return False  # graph inputs (ids, masks) cross freely
    type_proto = facts.value_types.get(name)
    if type_proto is None or type_proto.tensor_type.elem_type not in _INTEGER_TYPES:
        return False
    size = facts.tensor_bytes.get(name)
    return size is not None and size <= 64


def candidates(found: Sequence[Boundary], slack: float = 0.25) -> list[Boundary]:
    """Boundaries where one hidden state crosses, plus side tensors smaller than it together.

    The hidden state's size is the narrowest "widest tensor" among positions with at least 1 %
    of the weights on each side (before the embedding only token ids cross, which says nothing
    of the hidden size). A candidate's widest tensor is within ``1 + slack`` of it and the rest
    of its frontier (masks, rotary tables, a model input read late) adds up to less than it;
    inside a block a residual and a branch both cross, so no position there qualifies.
    Frontiers with a tensor of unknown type (bytes -1) are never candidates.
    """
    if not found:
        return []
    total = max(b.left_bytes + b.right_bytes for b in found)
    floor = 0.01 * total
    weighted = [
        b for b in found if b.left_bytes > floor and b.right_bytes > floor and b.largest_bytes >= 0
    ]
    if not weighted:
        return []
    hidden = min(b.largest_bytes for b in weighted)
    return [
        b
        for b in found
        if 0 <= b.largest_bytes <= hidden * (1 + slack)
        and b.frontier_bytes - b.largest_bytes < hidden
        and not b.shape_values
    ]


def segment_weights(facts: GraphFacts, start: int, stop: int) -> tuple[str, ...]:
    names: dict[str, None] = {}
    for weights in facts.node_weights[start:stop]:
        names.update(dict.fromkeys(sorted(weights)))
    return tuple(names)


def plan_segments(
    facts: GraphFacts, cuts: Iterable[int], min_segment_bytes: int = 0
) -> list[SegmentPlan]:
    """Segments between the given cut positions, small neighbours merged.

    Going left to right, a segment lighter than ``min_segment_bytes`` absorbs the next one
    until it is heavy enough; a light last segment joins the one before it.
    """
    count = len(facts.nodes)
    edges = sorted({c for c in cuts if 0 < c < count})
    spans = list(zip([0, *edges], [*edges, count], strict=True))

    def weight(start: int, stop: int) -> int:
        return sum(facts.initializer_bytes.get(n, 0) for n in segment_weights(facts, start, stop))

    merged: list[tuple[int, int]] = []
    for start, stop in spans:
        if merged and weight(*merged[-1]) < min_segment_bytes:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    if len(merged) > 1 and weight(*merged[-1]) < min_segment_bytes:
        last = merged.pop()
        merged[-1] = (merged[-1][0], last[1])
    plans = []
    for start, stop in merged:
        inputs = tuple(facts.inputs) if start == 0 else frontier_at(facts, start)
        outputs = tuple(facts.outputs) if stop == count else frontier_at(facts, stop)
        names = segment_weights(facts, start, stop)
        plans.append(SegmentPlan(start, stop, inputs, outputs, weight(start, stop), names))
    return plans


def build_segment(model: onnx.ModelProto, facts: GraphFacts, plan: SegmentPlan) -> onnx.ModelProto:
    """A standalone model of nodes start..stop with only the initializers it reads."""
    graph = model.graph
    wanted = set(plan.initializers)
    initializers = [t for t in graph.initializer if t.name in wanted]
    sparse = [t for t in graph.sparse_initializer if t.values.name in wanted]
    nodes = facts.nodes[plan.start : plan.stop]
    inside = {out for node in nodes for out in node.output if out}
    internal = [v for v in graph.value_info if v.name in inside and v.name not in plan.outputs]

    def value(name: str, role: str) -> onnx.ValueInfoProto:
        type_proto = facts.value_types.get(name)
        if type_proto is None:
            raise PartitionError(
                f"tensor {name!r} crosses a cut (segment {role}) but its type is unknown; run "
                "shape inference on the model or choose other cuts"
            )
        info = onnx.ValueInfoProto()
        info.name = name
        info.type.CopyFrom(type_proto)
        return info

    segment_graph = helper.make_graph(
        nodes,
        f"{graph.name or 'graph'}_{plan.start}_{plan.stop}",
        [value(n, "input") for n in plan.inputs],
        [value(n, "output") for n in plan.outputs],
        initializers,
        sparse_initializer=sparse,
        value_info=internal,
    )
    segment = helper.make_model(
        segment_graph,
        opset_imports=list(model.opset_import),
        producer_name=model.producer_name or "onnx-appliance",
        functions=list(model.functions),
    )
    segment.ir_version = model.ir_version
    return segment


def default_grouping(sizes: Sequence[int], stages: int) -> list[list[int]]:
    """Split segments into ``stages`` contiguous runs minimising the heaviest run (exact DP).

    Returns ``[[first, last], ...]`` (inclusive). Ties keep earlier runs as heavy as possible,
    which is stable and deterministic.
    """
    count = len(sizes)
    if not 1 <= stages <= count:
        raise PartitionError(
            f"cannot group {count} segment(s) into {stages} stage(s); choose 1 to {count}"
        )
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    inf = float("inf")
    # best[k][i]: the smallest possible heaviest run splitting the first i segments into k runs
    best = [[inf] * (count + 1) for _ in range(stages + 1)]
    cut = [[0] * (count + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, count - (stages - k) + 1):
            for j in range(k - 1, i):
                heaviest = max(best[k - 1][j], prefix[i] - prefix[j])
                if heaviest < best[k][i] or (heaviest == best[k][i] and j > cut[k][i]):
                    best[k][i] = heaviest
                    cut[k][i] = j
    runs: list[list[int]] = []
    stop = count
    for k in range(stages, 0, -1):
        start = cut[k][stop]
        runs.append([start, stop - 1])
        stop = start
    return runs[::-1]
