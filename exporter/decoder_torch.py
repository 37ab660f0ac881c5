"""The PyTorch side of a generation export: one segment of a Llama-family decoder as a module
whose tensors are exactly the package's graph interface (runtime/decoder.py), and its export.

The HF layers' own weights and norms are used; attention and the KV concatenation are written
out here so the graph takes ``past.{l}.*`` tensors and returns ``present.{l}.*`` instead of a
``Cache`` object, and so each segment builds its causal + padding mask and rotary tables from
``attention_mask`` and ``position_ids`` alone (only hidden states cross the network).

This module imports torch at import time: import it lazily (a node never needs it).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from exporter.errors import ExportError

log = logging.getLogger(__name__)

# rope variants whose inverse frequencies do not depend on the sequence length, so one graph
# serves every length ("dynamic" and "longrope" switch tables at run time)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
EXPORT_OPSET = 17


def segment_names(
    first: int, count: int, is_first: bool, is_last: bool
) -> tuple[list[str], list[str]]:
    """Graph input and output names of the segment holding layers first..first+count-1."""
    layers = range(first, first + count)
    inputs = ["input_ids" if is_first else f"hidden.{first}", "attention_mask", "position_ids"]
    inputs += [f"past.{n}.{part}" for n in layers for part in ("key", "value")]
    outputs = ["logits" if is_last else f"hidden.{first + count}"]
    outputs += [f"present.{n}.{part}" for n in layers for part in ("key", "value")]
    return inputs, outputs


def check_rope(config: Any) -> None:
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise ExportError(
            f"rope_scaling type {rope_type!r} changes its tables with the sequence length and "
            f"cannot be cut into fixed segments; accepted: {', '.join(STATIC_ROPE_TYPES)}"
        )


class DecoderSegment(nn.Module):
    """Layers first..first+count-1 of a LlamaForCausalLM, with the embeddings when first and the
    final norm + LM head (last position only) when last."""

    def __init__(self, model: Any, first: int, count: int, is_first: bool, is_last: bool) -> None:
        super().__init__()
        config = model.config
        self.is_first = is_first
        self.is_last = is_last
        self.embed = model.model.embed_tokens if is_first else None
        self.layers = nn.ModuleList(model.model.layers[first : first + count])
        self.norm = model.model.norm if is_last else None
        self.lm_head = model.lm_head if is_last else None
        rotary = model.model.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone(), persistent=False)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        hidden = self.embed(x) if self.embed is not None else x
        tokens = hidden.shape[1]
        mask = _additive_mask(attention_mask, tokens, hidden.dtype)
        cos, sin = self._rotary(position_ids, hidden.dtype)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            hidden, key, value = self._layer(
                layer, hidden, mask, cos, sin, past[2 * i], past[2 * i + 1]
            )
            presents += [key, value]
        if self.is_last:
            assert self.norm is not None and self.lm_head is not None
            # rows are left-padded, so the last position is real in every row
            hidden = self.lm_head(self.norm(hidden[:, -1, :]))
        return (hidden, *presents)

    def _rotary(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = cast(torch.Tensor, self.inv_freq)  # a registered buffer
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    def _layer(
        self,
        layer: Any,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        residual = hidden
        normed = layer.input_layernorm(hidden)
        shape = (*normed.shape[:-1], -1, self.head_dim)
        query = attn.q_proj(normed).view(shape).transpose(1, 2)
        key = attn.k_proj(normed).view(shape).transpose(1, 2)
        value = attn.v_proj(normed).view(shape).transpose(1, 2)
        query = _apply_rotary(query, cos, sin)
        key = torch.cat((past_key, _apply_rotary(key, cos, sin)), dim=2)
        value = torch.cat((past_value, value), dim=2)
        out = grouped_attention(query, key, value, mask, attn.scaling)
        hidden = residual + attn.o_proj(out.transpose(1, 2).reshape(*normed.shape[:-1], -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, key, value


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of ``query`` [B, Hq, T, D] over ``key``/``value`` [B, Hkv, S, D] (grouped
    query attention: query head h reads KV head h // (Hq / Hkv)), as [B, Hq, T, D].

    The query heads of one KV head become rows of one matmul against that head's keys, so the
    KV is never repeated Hq / Hkv times (an Expand and a copy of every layer's whole KV at
    every step): on SmolLM2 (9 query heads, 3 KV heads, CPU) decode steps of 1 / 4 / 16 / 32
    rows ran 1.04 / 1.04 / 1.15 / 1.23x faster than with the repeat (bench/package_ab.py).
    """
    batch, heads, tokens, dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    # head h = kv * groups + g, as repeating each KV head ``groups`` times would order them
    grouped = query.reshape(batch, kv_heads, groups * tokens, dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)) * scale
    scores = scores.reshape(batch, kv_heads, groups, tokens, total) + mask[:, :, None]
    probs = torch.softmax(scores, dim=-1).reshape(batch, kv_heads, groups * tokens, total)
    return torch.matmul(probs, value).reshape(batch, heads, tokens, dim)


def _additive_mask(attention_mask: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, tokens, past + tokens]: 0 where a query may look, the dtype's min elsewhere.

    The min, not -inf: a padding query sees no key at all and must give a finite (ignored) row.
    """
    total = attention_mask.shape[1]
    keys = torch.arange(total, device=attention_mask.device)
    queries = torch.arange(tokens, device=attention_mask.device) + (total - tokens)
    causal = keys[None, :] <= queries[:, None]
    allowed = causal[None, None, :, :] & (attention_mask[:, None, None, :] != 0)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype))


def example_inputs(
    config: Any, count: int, is_first: bool, batch: int = 2, past: int = 3, tokens: int = 5
) -> tuple[torch.Tensor, ...]:
    head_dim = int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    if is_first:
        x = torch.randint(0, config.vocab_size, (batch, tokens), dtype=torch.int64)
    else:
        x = torch.randn(batch, tokens, config.hidden_size)
    mask = torch.ones(batch, past + tokens, dtype=torch.int64)
    positions = (
        torch.arange(past, past + tokens, dtype=torch.int64).expand(batch, tokens).contiguous()
    )
    kv = [torch.randn(batch, config.num_key_value_heads, past, head_dim) for _ in range(2 * count)]
    return (x, mask, positions, *kv)


def export_segment(
    model: Any, first: int, count: int, is_first: bool, is_last: bool, path: Path
) -> None:
    """Write the segment's graph to ``path`` with TorchScript ``torch.onnx.export`` (weights
    inline; the caller re-saves it into the package)."""
    module = DecoderSegment(model, first, count, is_first, is_last).eval()
    inputs, outputs = segment_names(first, count, is_first, is_last)
    args = example_inputs(model.config, count, is_first)
    axes: dict[str, dict[int, str]] = {
        inputs[0]: {0: "batch", 1: "tokens"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "tokens"},
        outputs[0]: {0: "batch"} if is_last else {0: "batch", 1: "tokens"},
    }
    for name in inputs[3:]:
        axes[name] = {0: "batch", 2: "past"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 2: "total"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer warnings
        try:
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=EXPORT_OPSET,
                dynamo=False,
                do_constant_folding=True,
            )
        except Exception as exc:  # torch's exporter raises many untyped errors
            raise ExportError(
                f"layers {first}..{first + count - 1} could not be exported to ONNX: {exc}"
            ) from exc
