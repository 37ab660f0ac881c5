"""A node's speed: how fast it runs one fixed graph, the same on every node, so that figures
from different nodes compare and placement can give heavier spans to faster nodes.

The graph is built here, deterministically (weights from a fixed seed), rather than read from a
file: every install of this package builds the very same bytes. It is a chain of dense layers,
the kind of work a transformer span is made of, sized to take a few milliseconds per run on one
CPU core, so the whole measurement stays well under a second at node start.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.session import SessionSettings, create_session

ROWS = 64
WIDTH = 512
LAYERS = 4
FLOPS_PER_RUN = 2 * ROWS * WIDTH * WIDTH * LAYERS


def calibration_graph() -> bytes:
    """The fixed graph: x [ROWS, WIDTH] -> LAYERS x (MatMul, Add, Relu) -> y."""
    rng = np.random.default_rng(20261201)
    nodes, inits = [], []
    current = "x"
    for i in range(LAYERS):
        weight = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        bias = rng.standard_normal(WIDTH).astype(np.float32) * 0.01
        inits += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        out = "y" if i == LAYERS - 1 else f"h{i}"
        nodes += [
            helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [out]),
        ]
        current = out
    graph = helper.make_graph(
        nodes,
        "calibration",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass(frozen=True)
class Calibration:
    gflops: float  # the speed reported to the coordinator (median run)
    median_run_s: float
    device: str
    runs: int


def measure_speed(settings: SessionSettings, runs: int = 25, warmup: int = 5) -> Calibration:
    """Run the calibration graph with ``settings`` (the node's own device and threads) and
    return its median speed; the median, not the mean, so one preempted run does not count."""
    session = create_session(calibration_graph(), settings)
    x = np.random.default_rng(1).standard_normal((ROWS, WIDTH)).astype(np.float32)
    for _ in range(warmup):
        session.run({"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run({"x": x})
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return Calibration(FLOPS_PER_RUN / median / 1e9, median, session.device, runs)
