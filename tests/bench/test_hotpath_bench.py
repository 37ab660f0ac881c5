"""bench/mlp.py's MLP (its shapes, and that it computes the MLP it claims) and bench/hotpath.py's
quick path end to end: a real node and `appliance serve` on loopback, on a narrow MLP. Nothing
is timed: only that every system answered and the report holds its figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from bench import hotpath
from bench.mlp import build_mlp, layer_shapes, parameter_count, write_mlp_repo
from runtime.package import list_repository


def test_the_issue_mlp_has_its_layers() -> None:
    assert layer_shapes() == [(256, 3072)] + [(3072, 3072)] * 6 + [(3072, 256)]
    weights = sum(i * o + o for i, o in layer_shapes())
    assert 225e6 < weights * 4 < 240e6  # "about 230 MB" of fp32


def test_a_narrow_mlp_computes_relu_layers_from_a_fixed_seed(tmp_path: Path) -> None:
    model = build_mlp(seed=3, width=16, hidden_layers=2)
    onnx.checker.check_model(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert [inits[f"W{i}"].shape for i in range(4)] == [(256, 16), (16, 16), (16, 16), (16, 256)]
    assert parameter_count(model) == sum(
        i * o + o for i, o in layer_shapes(width=16, hidden_layers=2)
    )
    again = {
        t.name: numpy_helper.to_array(t)
        for t in build_mlp(seed=3, width=16, hidden_layers=2).graph.initializer
    }
    other = numpy_helper.to_array(build_mlp(seed=4, width=16, hidden_layers=2).graph.initializer[0])
    assert all(np.array_equal(inits[k], again[k]) for k in inits)
    assert not np.array_equal(inits["W0"], other)

    x = np.random.default_rng(0).standard_normal((5, 256), dtype=np.float32)
    h = x
    for i in range(4):
        h = h @ inits[f"W{i}"] + inits[f"b{i}"]
        h = np.maximum(h, 0) if i < 3 else h
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    assert y.shape == (5, 256)
    np.testing.assert_allclose(y, h, rtol=1e-4, atol=1e-4)

    path = write_mlp_repo(tmp_path, "mlp", seed=3, width=16)
    assert path == tmp_path / "mlp" / "1" / "model.onnx"
    assert list_repository(tmp_path) == {"mlp": [1]}  # a plain package the appliance serves


def test_the_full_mlp_builds_at_its_size() -> None:
    model = build_mlp()
    graph = model.graph
    assert graph.input[0].type.tensor_type.shape.dim[1].dim_value == 256
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == 256
    assert [tuple(t.dims) for t in graph.initializer if t.name.startswith("W")] == layer_shapes()
    assert 225e6 < parameter_count(model) * 4 < 240e6


def test_the_quick_hotpath_bench_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "hotpath.json"
    argv = ["--quick", "--width", "128", "--seconds", "0.5", "--no-levers", "--no-ray"]
    assert hotpath.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    systems = report["summary"]["systems"]
    assert set(systems) == {
        "in-process onnxruntime, batches of 32",
        "a standalone node",
        "`appliance serve` (coordinator + 1 node)",
    }
    for name, points in systems.items():
        assert set(points) == {"32", "1"}, name
        for point in points.values():
            assert point["rows_per_s"] > 0 and point["failures"] == 0, (name, point)
            assert point["server_cores"] > 0, (name, point)
    for name in ("a standalone node", "`appliance serve` (coordinator + 1 node)"):
        assert systems[name]["32"]["generator_cores"] > 0
        assert name in report["summary"]["added_latency_c1_p50_ms"]
    assert systems["in-process onnxruntime, batches of 32"]["32"]["x_in_process"] == 1.0


def test_the_generator_meter_leaves_out_the_servers_it_started() -> None:
    """The bench process is the load generator and the parent of the servers (and of the
    stealers): its own CPU must not count theirs; Ray's driver counts every other process."""
    import os
    import time

    from bench import ray_app
    from bench.hotpath_systems import CpuMeter, Stealer

    stealer = Stealer(0.5)
    try:
        time.sleep(0.3)  # the child is up and busy
        alone = CpuMeter([os.getpid()], alone=True)
        tree = CpuMeter([os.getpid()])
        others = ray_app.others_cpu_seconds()
        time.sleep(1.0)
        mine = alone.cores()
        assert mine < 0.1  # this process only slept
        assert tree.cores() > mine + 0.15  # the stealer, half a core, on a loaded machine too
        assert ray_app.others_cpu_seconds() - others > 0.15
    finally:
        stealer.stop()
    assert all(p.poll() is not None for p in stealer.processes)
