"""The partitioner on graphs built with onnx.helper, checked against brute force and onnxruntime."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.partition import (
    PartitionError,
    analyse,
    boundaries,
    build_segment,
    candidates,
    default_grouping,
    frontier_at,
    plan_segments,
    segment_weights,
)
from exporter.shapes import type_by_running, untyped

F = TensorProto.FLOAT


def weight(name: str, rows: int, cols: int, seed: int) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.normal(size=(rows, cols)).astype(np.float32) * 0.3, name)


def model_of(nodes, inputs, outputs, inits, name="g") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def vi(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, dims)


def chain_model(blocks: int = 4, width: int = 8) -> onnx.ModelProto:
    """x -> [MatMul, Relu] x blocks, with a small side input read by the last block."""
    nodes, inits, h = [], [], "x"
    for b in range(blocks):
        inits.append(weight(f"w{b}", width, width, b))
        nodes += [
            helper.make_node("MatMul", [h, f"w{b}"], [f"m{b}"]),
            helper.make_node("Relu", [f"m{b}"], [f"h{b}"]),
        ]
        h = f"h{b}"
    nodes.append(helper.make_node("Mul", [h, "scale"], ["y"]))
    return model_of(
        nodes,
        [vi("x", ["batch", width]), vi("scale", ["batch", 1])],
        [vi("y", ["batch", width])],
        inits,
    )


def branchy_model() -> onnx.ModelProto:
    """Branches that rejoin, a skip connection, a shared weight, two outputs (one early)."""
    inits = [
        weight("wa", 8, 8, 1),
        weight("wb", 8, 8, 2),
        weight("wc", 8, 8, 3),
        weight("shared", 8, 8, 4),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"]),
        helper.make_node("Relu", ["a"], ["early"]),  # graph output made early
        helper.make_node("MatMul", ["early", "wb"], ["b1"]),
        helper.make_node("MatMul", ["early", "shared"], ["b2"]),
        helper.make_node("Add", ["b1", "b2"], ["joined"]),  # branches rejoin
        helper.make_node("MatMul", ["joined", "wc"], ["c"]),
        helper.make_node("Tanh", ["c"], ["d"]),
        helper.make_node("Add", ["d", "a"], ["skip"]),  # skip over several boundaries
        helper.make_node("MatMul", ["skip", "shared"], ["e"]),  # shared weight read again
        helper.make_node("Mul", ["e", "x2"], ["y"]),  # second input read only at the end
    ]
    return model_of(
        nodes,
        [vi("x", ["batch", 8]), vi("x2", ["batch", 8])],
        [vi("y", ["batch", 8]), vi("early", ["batch", 8])],
        inits,
    )


def control_flow_model() -> onnx.ModelProto:
    """An If whose branches read outer-scope tensors, and a Loop accumulating over them."""
    inits = [weight("w0", 8, 8, 5), weight("w1", 8, 8, 6), weight("w2", 8, 8, 7)]
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["h0", "w1"], ["t_out"])],
        "then",
        [],
        [vi("t_out", ["batch", 8])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["h0"], ["e_out"])], "else", [], [vi("e_out", ["batch", 8])]
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "side"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            vi("acc_in", ["batch", 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            vi("acc_out", ["batch", 8]),
        ],
    )
    trips = numpy_helper.from_array(np.array(3, np.int64), "trips")
    true = numpy_helper.from_array(np.array(True), "true")
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["side"]),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["flag"]),
        helper.make_node(
            "If", ["flag"], ["chosen"], then_branch=then_graph, else_branch=else_graph
        ),
        helper.make_node("Loop", ["trips", "true", "chosen"], ["looped"], body=body),
        helper.make_node("MatMul", ["looped", "w2"], ["y"]),
    ]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    return model_of(
        nodes, [vi("x", ["batch", 8])], [vi("y", ["batch", 8])], [*inits, trips, true, zero]
    )


MODELS = {"chain": chain_model, "branchy": branchy_model, "control_flow": control_flow_model}


def feeds_for(model: onnx.ModelProto, rows: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = [d.dim_value or rows for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.normal(size=dims).astype(np.float32)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(
        zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted}), strict=True)
    )


@pytest.mark.parametrize("name", MODELS)
def test_sweep_frontiers_and_weights_equal_brute_force_at_every_position(name: str) -> None:
    model = MODELS[name]()
    facts = analyse(model)
    found = boundaries(facts)
    assert [b.position for b in found] == list(range(1, len(facts.nodes)))
    for boundary in found:
        p = boundary.position
        # brute force: made before p (or an input), read at or after p (or a graph output)
        made_before = set(facts.inputs) | {o for n in facts.nodes[:p] for o in n.output}
        read_after = {t for reads in facts.node_reads[p:] for t in reads} | set(facts.outputs)
        assert set(boundary.frontier) == made_before & read_after
        assert boundary.frontier == frontier_at(facts, p)
        left = set(segment_weights(facts, 0, p))
        right = set(segment_weights(facts, p, len(facts.nodes)))
        assert boundary.left_bytes == sum(facts.initializer_bytes[n] for n in left)
        assert boundary.right_bytes == sum(facts.initializer_bytes[n] for n in right)


@pytest.mark.parametrize("name", MODELS)
def test_cutting_at_any_position_gives_valid_segments_that_chain_to_the_whole(name: str) -> None:
    model = MODELS[name]()
    feeds = feeds_for(model)
    facts = analyse(model)
    # a Loop's output is left untyped by ONNX shape inference: type it from a run
    model = type_by_running(model, untyped(model, list(facts.producer)), feeds)
    facts = analyse(model)
    whole = run(model, feeds)
    for position in range(1, len(facts.nodes)):
        plans = plan_segments(facts, [position])
        env = dict(feeds)
        for plan in plans:
            segment = build_segment(model, facts, plan)
            onnx.checker.check_model(segment, full_check=True)
            used = {
                n
                for node_weights in facts.node_weights[plan.start : plan.stop]
                for n in node_weights
            }
            assert {t.name for t in segment.graph.initializer} == used  # only what it reads
            env.update(run(segment, env))
        for out, want in whole.items():
            np.testing.assert_allclose(env[out], want, rtol=1e-6, atol=1e-6)


def test_control_flow_nodes_carry_their_outer_scope_reads() -> None:
    facts = analyse(control_flow_model())
    if_index = next(i for i, n in enumerate(facts.nodes) if n.op_type == "If")
    loop_index = next(i for i, n in enumerate(facts.nodes) if n.op_type == "Loop")
    assert "h0" in facts.node_reads[if_index] and "w1" in facts.node_weights[if_index]
    assert "side" in facts.node_reads[loop_index]
    assert "side" in frontier_at(facts, loop_index)  # the Loop body reads it from outside


def test_a_shared_weight_is_copied_into_both_segments_and_counted_in_both() -> None:
    model = branchy_model()
    facts = analyse(model)
    plans = plan_segments(facts, [5])
    assert all("shared" in plan.initializers for plan in plans)
    shared = facts.initializer_bytes["shared"]
    assert sum(p.weight_bytes for p in plans) == sum(facts.initializer_bytes.values()) + shared


def test_candidates_are_the_block_boundaries_of_a_chain() -> None:
    facts = analyse(chain_model(blocks=4))
    chosen = [b.position for b in candidates(boundaries(facts))]
    # between blocks (after each Relu) and between MatMul and Relu the frontier is one hidden
    # state plus the side input; everything there is equally narrow
    assert chosen == list(range(1, len(facts.nodes)))
    frontiers = {b.frontier for b in boundaries(facts)}
    assert all("scale" in f for f in frontiers)  # the late-read input is passed along


def test_wide_frontiers_are_not_candidates() -> None:
    facts = analyse(branchy_model())
    found = {b.position: b for b in boundaries(facts)}
    chosen = {b.position for b in candidates(list(found.values()))}
    # inside the rejoining branches (b1 and b2 both live) the frontier is wider than elsewhere
    assert 4 not in chosen and found[4].frontier_bytes > min(
        b.frontier_bytes for b in found.values()
    )


def test_small_segments_merge_with_their_neighbours() -> None:
    facts = analyse(chain_model(blocks=6))
    one_block = 8 * 8 * 4
    cuts = list(range(1, len(facts.nodes)))
    plans = plan_segments(facts, cuts, min_segment_bytes=2 * one_block)
    assert [p.weight_bytes for p in plans] == [2 * one_block] * 3
    assert plans[0].start == 0 and plans[-1].stop == len(facts.nodes)
    for before, after in zip(plans, plans[1:], strict=False):
        assert before.stop == after.start and before.outputs == after.inputs


def test_untyped_frontier_tensors_are_refused_when_built() -> None:
    model = chain_model(blocks=2)
    del model.graph.value_info[:]  # no shapes: the cut tensors cannot be typed
    facts = analyse(model)
    assert all(b.frontier_bytes == -1 for b in boundaries(facts))
    with pytest.raises(PartitionError, match="type is unknown"):
        build_segment(model, facts, plan_segments(facts, [2])[1])


@pytest.mark.parametrize("seed", range(12))
def test_default_grouping_is_optimal_against_every_grouping(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in rng.integers(1, 100, size=int(rng.integers(1, 9)))]
    for stages in range(1, len(sizes) + 1):
        runs = default_grouping(sizes, stages)
        assert len(runs) == stages and runs[0][0] == 0 and runs[-1][1] == len(sizes) - 1
        assert all(a[1] + 1 == b[0] for a, b in zip(runs, runs[1:], strict=False))
        heaviest = max(sum(sizes[a : b + 1]) for a, b in runs)
        best = min(
            max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, len(sizes)), strict=True))
            for cuts in combinations(range(1, len(sizes)), stages - 1)
        )
        assert heaviest == best


def test_default_grouping_refuses_more_stages_than_segments() -> None:
    with pytest.raises(PartitionError, match="cannot group 3 segment"):
        default_grouping([1, 2, 3], 4)
