"""Exporting a torch module with ``torch.onnx.export`` (dynamo first, then TorchScript), and
PyTorch's own outputs on the samples, which the exported graph is checked against."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.converted import Exporter, _fresh_dir, _short
from exporter.errors import ExportError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# protobuf cannot serialise 2 GiB; keep headroom for the graph next to the weights
_EXTERNAL_DATA_BYTES = 1_800_000_000
# the dynamo exporter emits opset 18 and its down-conversion to 17 fails on transformer graphs
_DYNAMO_MIN_OPSET = 18
# odd example sizes: an output whose dim 1 equals this is very likely the sequence axis
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE = 2, 13

# ---------------------------------------------------------------------------- torch helpers


def _named_outputs(value: Any, prefix: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """Flatten outputs as torch.onnx does: a tensor is "output", a tuple output_0..., a dict
    (a Hugging Face ModelOutput) its keys; None and non-tensor leaves are no ONNX outputs."""
    import torch

    if isinstance(value, torch.Tensor):
        return [(prefix or "output", value)]
    if isinstance(value, Mapping):
        parts = [(str(k) if prefix is None else f"{prefix}_{k}", v) for k, v in value.items()]
    elif isinstance(value, list | tuple):
        parts = [(f"{prefix or 'output'}_{i}", v) for i, v in enumerate(value)]
    else:
        return []
    return [named for name, v in parts if v is not None for named in _named_outputs(v, name)]


def _ordered_inputs(
    module: torch.nn.Module, inputs: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inputs in forward()'s parameter order, which is the order the exporters bind them in."""
    params = list(inspect.signature(module.forward).parameters)
    rank = {name: i for i, name in enumerate(params)}
    return dict(sorted(inputs.items(), key=lambda item: rank.get(item[0], len(params))))


def _is_integer(tensor: torch.Tensor) -> bool:
    import torch

    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _default_axes(
    inputs: Mapping[str, torch.Tensor], outputs: Sequence[tuple[str, torch.Tensor]]
) -> dict[str, dict[int, str]]:
    """Dim 0 "batch" everywhere; dim 1 "sequence" for integer inputs of rank >= 2 and for
    outputs of rank >= 2 whose dim 1 equals that sequence length."""
    axes: dict[str, dict[int, str]] = {}
    sequence: int | None = None
    for name, tensor in inputs.items():
        if tensor.dim() == 0:
            continue
        axes[name] = {0: "batch"}
        if tensor.dim() >= 2 and _is_integer(tensor):
            sequence = tensor.shape[1] if sequence is None else sequence
            # an integer input of another length gets its own axis, not a false equality
            axes[name][1] = "sequence" if tensor.shape[1] == sequence else f"{name}_dim1"
    for name, tensor in outputs:
        if tensor.dim() == 0:
            continue
        axes[name] = {0: "batch"}
        if tensor.dim() >= 2 and sequence is not None and tensor.shape[1] == sequence:
            axes[name][1] = "sequence"
    return axes


def _parameter_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _torch_export(
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    outputs: list[str],
    axes: Mapping[str, Mapping[int, str]],
    target: Path,
    opset: int,
    exporter: Exporter,
) -> str:
    """Export with torch.onnx (dynamo, then TorchScript for "auto"); the path that worked."""
    kinds = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    external = _parameter_bytes(module) > _EXTERNAL_DATA_BYTES
    errors = []
    for kind in kinds:
        _fresh_dir(target.parent)
        try:
            if kind == "dynamo":
                _export_dynamo(module, inputs, outputs, axes, target, opset, external)
            else:
                _export_torchscript(module, inputs, outputs, axes, target, opset)
        except Exception as exc:  # both exporters raise many untyped errors
            log.warning("torch.onnx.export (%s) failed: %s", kind, _short(exc))
            errors.append(f"torch.onnx {kind}: {_short(exc)}")
            continue
        return f"torch.onnx-{kind}"
    raise ExportError("torch.onnx.export failed: " + " | ".join(errors))


def _export_dynamo(
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    outputs: list[str],
    axes: Mapping[str, Mapping[int, str]],
    target: Path,
    opset: int,
    external: bool,
) -> None:
    import torch

    # named Dims shared by name: dynamic_axes is mapped to the inputs by position there
    dims: dict[str, Any] = {}

    def dim(name: str) -> Any:
        return dims.setdefault(name, torch.export.Dim(re.sub(r"\W", "_", name)))

    shapes = {
        name: {axis: dim(label) for axis, label in axes[name].items()} if name in axes else None
        for name in inputs
    }
    if opset < _DYNAMO_MIN_OPSET:
        log.info("the dynamo exporter writes opset %d (asked for %d)", _DYNAMO_MIN_OPSET, opset)
    torch.onnx.export(
        module,
        (),
        str(target),
        kwargs=inputs,
        input_names=list(inputs),
        output_names=outputs,
        dynamic_shapes=shapes,
        opset_version=max(opset, _DYNAMO_MIN_OPSET),
        dynamo=True,
        external_data=external,
        verbose=False,
    )


def _export_torchscript(
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    outputs: list[str],
    axes: Mapping[str, Mapping[int, str]],
    target: Path,
    opset: int,
) -> None:
    import torch

    # tracing wants tuples: a Hugging Face model returns them in ModelOutput's key order
    config = getattr(module, "config", None)
    saved = getattr(config, "return_dict", None)
    if saved is not None:
        config.return_dict = False  # type: ignore[union-attr]
    try:
        torch.onnx.export(
            module,
            (),
            str(target),
            kwargs=inputs,
            input_names=list(inputs),
            output_names=outputs,
            dynamic_axes={name: dict(dims) for name, dims in axes.items()},
            opset_version=opset,
            dynamo=False,
        )
    finally:
        if saved is not None:
            config.return_dict = saved  # type: ignore[union-attr]


def _reference(
    model: Callable[..., Any],
    samples: list[dict[str, np.ndarray]],
    onnx_outputs: list[str],
) -> list[dict[str, np.ndarray]]:
    """PyTorch's outputs on the samples, for the ONNX outputs PyTorch also names."""
    import torch

    references = []
    with torch.no_grad():
        for feeds in samples:
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
            named = dict(_named_outputs(model(**tensors)))
            references.append(
                {k: named[k].detach().cpu().numpy() for k in onnx_outputs if k in named}
            )
    missing = [k for k in onnx_outputs if k not in references[0]] if references else []
    if missing:
        log.warning("PyTorch names no output %s; they get no reference", ", ".join(missing))
    return references
