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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx
from onnx import helper

from exporter.errors import PartitionError
from exporter.graph_facts import (  # noqa: F401 (re-exported: the partitioner's API)
    CONTROL_FLOW,
    SYMBOLIC_DIM,
    GraphFacts,
    analyse,
    tensors_without_producer,
    topological_order,
)


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
