"""The hot-path MLP: a dense fp32 model whose cost is all matrix products, no tokens, no vocab.

    python -m bench.mlp DIR            # writes DIR/mlp/1/model.onnx (about 233 MB), prints it

Input ``x`` FP32 [batch, 256] -> 3072 -> six 3072 -> 3072 layers (ReLU after each, and after
the first) -> 3072 -> 256 (no activation) = ``y`` FP32 [batch, 256]. Weights come from a
fixed seed, scaled by sqrt(2 / fan_in) so activations stay O(1) through the eight layers.
The file is a plain ``model.onnx`` package (one segment) that ``appliance node`` and
``appliance serve --model-repo DIR`` serve as they find it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
INPUT, OUTPUT = "x", "y"
IN_FEATURES, WIDTH, HIDDEN_LAYERS, OUT_FEATURES = 256, 3072, 6, 256


def layer_shapes(
    in_features: int = IN_FEATURES,
    width: int = WIDTH,
    hidden_layers: int = HIDDEN_LAYERS,
    out_features: int = OUT_FEATURES,
) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of each weight, first to last: in -> width, hidden x width -> width,
    width -> out."""
    return [(in_features, width)] + [(width, width)] * hidden_layers + [(width, out_features)]


def build_mlp(
    seed: int = 0,
    in_features: int = IN_FEATURES,
    width: int = WIDTH,
    hidden_layers: int = HIDDEN_LAYERS,
    out_features: int = OUT_FEATURES,
) -> onnx.ModelProto:
    """The MLP with onnx.helper; ReLU after every layer but the last."""
    rng = np.random.default_rng(seed)
    shapes = layer_shapes(in_features, width, hidden_layers, out_features)
    nodes, initializers = [], []
    current = INPUT
    for index, (fan_in, fan_out) in enumerate(shapes):
        weight = rng.standard_normal((fan_in, fan_out), dtype=np.float32)
        weight *= np.float32(np.sqrt(2.0 / fan_in))
        bias = (rng.standard_normal(fan_out, dtype=np.float32) * np.float32(0.01)).astype(
            np.float32
        )
        initializers += [
            numpy_helper.from_array(weight, f"W{index}"),
            numpy_helper.from_array(bias, f"b{index}"),
        ]
        last = index == len(shapes) - 1
        product, summed = f"mm{index}", OUTPUT if last else f"pre{index}"
        nodes.append(helper.make_node("MatMul", [current, f"W{index}"], [product]))
        nodes.append(helper.make_node("Add", [product, f"b{index}"], [summed]))
        if not last:
            nodes.append(helper.make_node("Relu", [summed], [f"h{index}"]))
            current = f"h{index}"
    graph = helper.make_graph(
        nodes,
        "hotpath_mlp",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", out_features])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    return model


def parameter_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def write_mlp_repo(repo: Path, name: str = "mlp", seed: int = 0, **shape: int) -> Path:
    """``repo/name/1/model.onnx`` (a plain one-segment package); returns the file's path."""
    folder = repo / name / "1"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(build_mlp(seed, **shape), str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("repo", type=Path, help="model repository to write the package into")
    parser.add_argument("--name", default="mlp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=WIDTH)
    args = parser.parse_args(argv)
    path = write_mlp_repo(args.repo, args.name, args.seed, width=args.width)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
