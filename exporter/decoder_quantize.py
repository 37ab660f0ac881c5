"""Weight quantisation of generation segments, and what it costs in accuracy.

``int4``: onnxruntime's ``MatMulNBits`` weight-only quantiser (block 32, symmetric, accuracy
level 4: int8 activations inside the kernel) on every MatMul but the LM head's, which gets 8 bits
(measured on SmolLM2: a 4-bit head alone raised the perplexity ratio from 1.33 to 1.45 on
``perplexity_text.txt``; 8 bits cost 0.3 % of perplexity over an fp32 head and keep the package at
203 MB instead of 280 MB). The embeddings (a Gather) stay fp32.
``int8``: ``quantize_dynamic`` with int8 weights, per TENSOR: its per-channel mode measured a
perplexity ratio of 105 (1.5 % top-1 agreement) on these graphs, per tensor 1.11.
Both keep the FP32 interface (hidden states, KV, logits), so quantised and fp32 spans chain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from exporter.errors import ExportError

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("int4", "int8")
INT4_BLOCK = 32
INT4_ACCURACY_LEVEL = 4
DEFAULT_MAX_PERPLEXITY_RATIO = 1.25
SCHEMES = {
    "int4": "MatMulNBits 4-bit, block 32, symmetric, accuracy level 4; LM head 8-bit",
    "int8": "quantize_dynamic, int8 weights per tensor",
}


@dataclass(frozen=True)
class QuantizationFigures:
    method: str
    perplexity_fp32: float
    perplexity: float
    top1_agreement: float
    max_perplexity_ratio: float
    tokens: int  # of the perplexity text
    steps: int  # teacher-forced steps behind the agreement
    forced: bool = False

    @property
    def ratio(self) -> float:
        return self.perplexity / self.perplexity_fp32

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "scheme": SCHEMES[self.method],
            "perplexity_fp32": round(self.perplexity_fp32, 4),
            "perplexity": round(self.perplexity, 4),
            "perplexity_ratio": round(self.ratio, 4),
            "max_perplexity_ratio": self.max_perplexity_ratio,
            "perplexity_tokens": self.tokens,
            "top1_agreement": round(self.top1_agreement, 4),
            "agreement_steps": self.steps,
            "forced": self.forced,
        }


def check_method(method: str | None) -> None:
    if method is not None and method not in QUANTIZE_CHOICES:
        raise ExportError(
            f"quantize {method!r} is not supported for generation packages; accepted: "
            f"{', '.join(QUANTIZE_CHOICES)}"
        )


def quantize_segment(source: Path, target: Path, method: str) -> onnx.ModelProto:
    """Quantise one segment file; returns the quantised model (also saved at ``target``)."""
    check_method(method)
    if method == "int4":
        model = _matmul_nbits(onnx.load(str(source)), bits=4, exclude=_head_nodes)
        model = _matmul_nbits(model, bits=8, include=_head_nodes)
        onnx.save_model(model, str(target))
        return model
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), per_channel=False, weight_type=QuantType.QInt8)
    return onnx.load(str(target))


def _head_nodes(model: onnx.ModelProto) -> list[str]:
    """The MatMul that makes ``logits`` (the LM head), in the last segment only."""
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output]


def _matmul_nbits(
    model: onnx.ModelProto,
    bits: int,
    include: Callable[[onnx.ModelProto], list[str]] | None = None,
    exclude: Callable[[onnx.ModelProto], list[str]] | None = None,
) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    included = include(model) if include is not None else None
    if included is not None and not included:
        return model
    config = DefaultWeightOnlyQuantConfig(
        block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL, bits=bits
    )
    quantizer = MatMulNBitsQuantizer(
        model,
        algo_config=config,
        nodes_to_include=included,
        nodes_to_exclude=exclude(model) if exclude is not None else None,
    )
    quantizer.process()
    quantized: onnx.ModelProto = quantizer.model.model
    return quantized
