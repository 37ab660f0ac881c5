"""Write a decoder's generation segments: layers cut at block boundaries, each segment owning
its layers' KV (graph interface: runtime/decoder.py; the graphs: exporter/decoder_torch.py).

The default cut is one decoder layer per segment, so placement can balance spans finely. Chaining
one session per segment costs a fixed overhead per session and step: on SmolLM2 (one decode step
of layers 1..10, past 40, 2 threads, medians of 400-600 interleaved runs) 10 single-layer
sessions took 24-25 % longer than one session (13.7-14.0 ms against 11.0-11.3 ms), so
``runtime.decoder.load_decoder_span`` merges a span's segments into one session at load; the
merged graph ran within 4 % of the same 10 layers exported as one graph. Measure it again with
``python -m exporter.decoder_bench REPO NAME``.

Each segment is exported by TorchScript ``torch.onnx.export`` (0.3-0.5 s a layer here, 3-4 s for
the ends that hold the 49k x 576 embeddings or LM head) and written with the package writer's
fsynced ``_write_segment``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from exporter.errors import ExportError
from exporter.package_writer import _write_segment
from runtime.manifest import KvLayout, SegmentInfo

log = logging.getLogger(__name__)

# protobuf cannot hold 2 GiB; keep headroom for the graph beside the weights
EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass(frozen=True)
class SegmentLayers:
    """Which decoder layers one segment holds, and whether it has the embeddings or the head."""

    first: int
    count: int
    is_first: bool
    is_last: bool


def plan_layers(num_layers: int, layers_per_segment: int | None = None) -> list[SegmentLayers]:
    """Consecutive runs of ``layers_per_segment`` layers (default 1; the last run may be
    shorter) covering 0..num_layers-1."""
    per = 1 if layers_per_segment is None else layers_per_segment
    if isinstance(per, bool) or not isinstance(per, int) or not 1 <= per <= num_layers:
        raise ExportError(
            f"layers_per_segment must be an integer from 1 to the model's {num_layers} layers, "
            f"got {layers_per_segment!r}"
        )
    starts = list(range(0, num_layers, per))
    return [
        SegmentLayers(s, min(per, num_layers - s), s == 0, s + per >= num_layers) for s in starts
    ]


def kv_layout(config: Any, segment: SegmentLayers) -> KvLayout:
    return KvLayout(
        first_layer=segment.first,
        layers=segment.count,
        kv_heads=int(config.num_key_value_heads),
        head_dim=head_dim(config),
        dtype="FP32",
    )


def head_dim(config: Any) -> int:
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


def estimate_bytes(model: Any, plan: list[SegmentLayers]) -> list[int]:
    """fp32 weight bytes of each planned segment (tied weights count in both ends)."""
    layer_bytes = [_param_bytes(layer) for layer in model.model.layers]
    embed = _param_bytes(model.model.embed_tokens)
    head = _param_bytes(model.lm_head) + _param_bytes(model.model.norm)
    sizes = []
    for seg in plan:
        size = sum(layer_bytes[seg.first : seg.first + seg.count])
        size += embed if seg.is_first else 0
        size += head if seg.is_last else 0
        sizes.append(size)
    return sizes


def _param_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_segments(
    model: Any,
    plan: list[SegmentLayers],
    folder: Path,
    progress: Callable[[int, int], AbstractContextManager[Any]] | None = None,
) -> list[SegmentInfo]:
    """Export every planned segment into ``folder`` as ``segment-{k}.onnx`` (fsynced); returns
    their SegmentInfo with KV layouts. ``progress(k, n)`` wraps each segment's export (a
    context manager factory, e.g. a progress line)."""
    from exporter.decoder_torch import check_rope, export_segment, segment_names

    check_rope(model.config)
    infos: list[SegmentInfo] = []
    with tempfile.TemporaryDirectory(prefix="appliance-decoder-") as scratch:
        for k, seg in enumerate(plan):
            staged = Path(scratch) / f"staged-{k}.onnx"
            context = progress(k, len(plan)) if progress is not None else nullcontext()
            with context:
                export_segment(model, seg.first, seg.count, seg.is_first, seg.is_last, staged)
                proto = onnx.load(str(staged))
                staged.unlink()
                inputs, outputs = segment_names(seg.first, seg.count, seg.is_first, seg.is_last)
                _check_interface(proto, k, inputs, outputs)
                info = _write_segment(folder, k, proto, EXTERNAL_DATA_BYTES)
                del proto
            infos.append(dataclasses.replace(info, kv=kv_layout(model.config, seg)))
    return infos


def rewrite_segment(folder: Path, k: int, proto: onnx.ModelProto, kv: KvLayout) -> SegmentInfo:
    """Replace segment k (e.g. by its quantised form), keeping its KV layout."""
    for stale in folder.glob(f"segment-{k}.onnx*"):
        stale.unlink()
    info = _write_segment(folder, k, proto, EXTERNAL_DATA_BYTES)
    return dataclasses.replace(info, kv=kv)


def _check_interface(proto: onnx.ModelProto, k: int, inputs: list[str], outputs: list[str]) -> None:
    weights = {t.name for t in proto.graph.initializer}
    got_in = [v.name for v in proto.graph.input if v.name not in weights]
    got_out = [v.name for v in proto.graph.output]
    if got_in != inputs or got_out != outputs:
        raise ExportError(
            f"segment {k} was exported with inputs {got_in} and outputs {got_out}; the "
            f"generation interface needs {inputs} -> {outputs}"
        )
