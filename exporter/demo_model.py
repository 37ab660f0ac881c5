"""The built-in demo model: a transformer-encoder-style stack made with onnx.helper (no torch).

It gives the appliance something realistic to serve, cut and place without any download: token ids
in, hidden states out, ``blocks`` pre-norm encoder blocks in between. Every block reads and writes
one narrow tensor ``block{i}.out`` [batch, sequence, hidden], the boundaries the exporter cuts at.
Weights are random (numpy ``default_rng(seed)``), so two builds with one config are byte-identical.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.errors import ExportError, PackageExists
from runtime.errors import ModelLoadError
from runtime.manifest import MANIFEST_FILE, read_manifest

log = logging.getLogger(__name__)

DEMO_OPSET = 17
# IR 8 is the lowest that carries opset 17, so older onnxruntime builds load the model too
DEMO_IR_VERSION = 8
DEMO_SOURCE = "builtin:demo"
INPUT_NAME = "input_ids"
OUTPUT_NAME = "last_hidden_state"
_LN_EPSILON = 1e-5
_INIT_STD = 0.02


class _Builder:
    """Collects nodes and initializers; weights are drawn in build order from one generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        values = self.rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(_INIT_STD)
        return self.const(name, values)

    def const(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def linear(self, x: str, prefix: str, fan_in: int, fan_out: int) -> str:
        w = self.weight(f"{prefix}.weight", (fan_in, fan_out))
        b = self.const(f"{prefix}.bias", np.zeros(fan_out, dtype=np.float32))
        y = self.node("MatMul", [x, w], f"{prefix}.matmul")
        return self.node("Add", [y, b], f"{prefix}.out")

    def layer_norm(self, x: str, prefix: str, hidden: int, output: str | None = None) -> str:
        scale = self.const(f"{prefix}.weight", np.ones(hidden, dtype=np.float32))
        bias = self.const(f"{prefix}.bias", np.zeros(hidden, dtype=np.float32))
        return self.node(
            "LayerNormalization",
            [x, scale, bias],
            output or f"{prefix}.out",
            axis=-1,
            epsilon=_LN_EPSILON,
        )


def _attention(b: _Builder, x: str, p: str, hidden: int, heads: int) -> str:
    head_dim = hidden // heads
    # 0 copies the input dim (allowzero=0), so batch and sequence stay dynamic
    split = b.const(f"{p}.split_shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge = b.const(f"{p}.merge_shape", np.array([0, 0, hidden], dtype=np.int64))
    scale = b.const(f"{p}.scale", np.array(1.0 / math.sqrt(head_dim), dtype=np.float32))
    q = b.node("Reshape", [b.linear(x, f"{p}.q", hidden, hidden), split], f"{p}.q.heads")
    k = b.node("Reshape", [b.linear(x, f"{p}.k", hidden, hidden), split], f"{p}.k.heads")
    v = b.node("Reshape", [b.linear(x, f"{p}.v", hidden, hidden), split], f"{p}.v.heads")
    q = b.node("Transpose", [q], f"{p}.q.bhsd", perm=[0, 2, 1, 3])
    k_t = b.node("Transpose", [k], f"{p}.k.bhds", perm=[0, 2, 3, 1])
    v = b.node("Transpose", [v], f"{p}.v.bhsd", perm=[0, 2, 1, 3])
    scores = b.node("MatMul", [q, k_t], f"{p}.scores")
    scores = b.node("Mul", [scores, scale], f"{p}.scores.scaled")
    probs = b.node("Softmax", [scores], f"{p}.probs", axis=-1)
    ctx = b.node("MatMul", [probs, v], f"{p}.context")
    ctx = b.node("Transpose", [ctx], f"{p}.context.bshd", perm=[0, 2, 1, 3])
    ctx = b.node("Reshape", [ctx, merge], f"{p}.context.merged")
    return b.linear(ctx, f"{p}.o", hidden, hidden)


def _mlp(b: _Builder, x: str, p: str, hidden: int, ffn: int) -> str:
    h = b.linear(x, f"{p}.fc1", hidden, ffn)
    # exact Gelu from Erf (the Gelu op needs opset 20); onnxruntime fuses this pattern
    inv_sqrt2 = b.const(f"{p}.gelu.inv_sqrt2", np.array(1.0 / math.sqrt(2.0), dtype=np.float32))
    one = b.const(f"{p}.gelu.one", np.array(1.0, dtype=np.float32))
    half = b.const(f"{p}.gelu.half", np.array(0.5, dtype=np.float32))
    e = b.node("Erf", [b.node("Mul", [h, inv_sqrt2], f"{p}.gelu.scaled")], f"{p}.gelu.erf")
    e = b.node("Add", [e, one], f"{p}.gelu.erf_plus_one")
    g = b.node("Mul", [h, e], f"{p}.gelu.x_times")
    g = b.node("Mul", [g, half], f"{p}.gelu.out")
    return b.linear(g, f"{p}.fc2", ffn, hidden)


def build_demo_model(
    blocks: int = 12,
    hidden: int = 384,
    heads: int = 6,
    ffn: int = 1536,
    vocab: int = 8192,
    seed: int = 0,
) -> onnx.ModelProto:
    """Build the demo encoder: ``input_ids`` INT64 [batch, sequence] -> ``last_hidden_state``
    FP32 [batch, sequence, hidden]. Deterministic for one set of arguments."""
    if min(blocks, hidden, heads, ffn, vocab) < 1 or hidden % heads:
        raise ExportError(
            f"demo config blocks={blocks} hidden={hidden} heads={heads} ffn={ffn} vocab={vocab} "
            "is not valid: all must be >= 1 and hidden divisible by heads"
        )
    b = _Builder(seed)
    table = b.weight("embed.weight", (vocab, hidden))
    x = b.node("Gather", [table, INPUT_NAME], "embed.out", axis=0)
    boundaries = [x]
    for i in range(blocks):
        p = f"block{i}"
        attn = _attention(b, b.layer_norm(x, f"{p}.ln1", hidden), f"{p}.attn", hidden, heads)
        x = b.node("Add", [x, attn], f"{p}.attn.residual")
        mlp = _mlp(b, b.layer_norm(x, f"{p}.ln2", hidden), f"{p}.mlp", hidden, ffn)
        x = b.node("Add", [x, mlp], f"{p}.out")
        boundaries.append(x)
    b.layer_norm(x, "final_ln", hidden, output=OUTPUT_NAME)

    hidden_shape: list[str | int] = ["batch", "sequence", hidden]
    graph = helper.make_graph(
        b.nodes,
        "demo_encoder",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, hidden_shape)],
        initializer=b.initializers,
        # typed block boundaries let the cutter see each cut's signature without inference
        value_info=[
            helper.make_tensor_value_info(name, TensorProto.FLOAT, hidden_shape)
            for name in boundaries
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", DEMO_OPSET)],
        producer_name="onnx-appliance",
        doc_string=(
            f"built-in demo encoder: blocks={blocks} hidden={hidden} heads={heads} "
            f"ffn={ffn} vocab={vocab} seed={seed}"
        ),
    )
    model.ir_version = DEMO_IR_VERSION
    return model


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers (raw data), i.e. its weights."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def write_demo_package(
    repo: Path,
    name: str = "demo",
    version: int = 1,
    *,
    force: bool = False,
    **build_kwargs: int,
) -> Path:
    """Build the demo model as one graph and export it through the real path: cut at its narrow
    boundaries (one segment per block at the default size), verified, written atomically."""
    from exporter.export import export_model

    model = build_demo_model(**build_kwargs)
    result = export_model(model, repo, name, version=version, force=force, source_label=DEMO_SOURCE)
    assert result.folder is not None
    return result.folder


def ensure_demo_package(
    repo: Path, name: str = "demo", version: int = 1, **build_kwargs: int
) -> Path:
    """Return ``{repo}/{name}/{version}`` if it holds a complete package, else (re)write it."""
    folder = Path(repo) / name / str(version)
    if _is_complete(folder):
        return folder
    try:
        # a folder that exists but is incomplete is replaced rather than refused
        return write_demo_package(repo, name, version, force=folder.exists(), **build_kwargs)
    except PackageExists:
        # another process wrote it between our check and our rename
        if _is_complete(folder):
            return folder
        raise


def _is_complete(folder: Path) -> bool:
    if not (folder / MANIFEST_FILE).is_file():
        return False
    try:
        manifest = read_manifest(folder)
    except ModelLoadError:
        return False
    files = [f for s in manifest.segments for f in [s.file, *s.external_data]]
    return bool(files) and all((folder / f).is_file() for f in files)
