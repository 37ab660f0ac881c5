"""Turn a SOURCE into one ONNX model, sample inputs, and PyTorch's outputs on those samples.

SOURCE is one of: an existing ``.onnx`` file, a Hugging Face model folder (``config.json``), or
``module.path:factory`` naming a callable that returns ``(torch.nn.Module, inputs)`` or
``(module, inputs, dynamic_axes)``. Hugging Face folders go through optimum's exporter first and
fall back to ``torch.onnx.export`` (dynamo, then TorchScript); factories use ``torch.onnx.export``.

torch, transformers and optimum are imported inside functions: a node imports this module (for
``sample_inputs_for``) without the ``export`` extra installed.
"""

from __future__ import annotations

import gc
import importlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.converted import (
    ACCEPTED,
    EXPORTERS,
    Converted,
    Exporter,
    _check_onnx,
    _output_names,
    _short,
)
from exporter.errors import ExportError, SourceError
from exporter.extras import _require
from exporter.hf_source import _convert_hf
from exporter.samples import sample_inputs_for
from exporter.torch_export import (
    _default_axes,
    _named_outputs,
    _ordered_inputs,
    _reference,
    _torch_export,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_FACTORY = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")

log = logging.getLogger(__name__)


def convert(
    source: str,
    workdir: Path,
    *,
    task: str | None = None,
    opset: int = 17,
    exporter: Exporter = "auto",
) -> Converted:
    """Export SOURCE into ``workdir`` (an .onnx SOURCE is used where it lies)."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; accepted: {', '.join(EXPORTERS)}")
    if not source or not source.strip():
        raise SourceError(f"no SOURCE given; accepted: {ACCEPTED}")
    path = Path(source).expanduser()
    if path.is_dir():
        return _convert_hf(path.resolve(), Path(workdir), task, opset, exporter)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise SourceError(f"ONNX file not found: {path}")
        return _convert_onnx(path.resolve(), task)
    if _FACTORY.fullmatch(source):
        if exporter == "optimum":
            raise ExportError("exporter 'optimum' applies to Hugging Face folders only")
        return _convert_factory(source, Path(workdir), task, opset, exporter)
    if path.exists():
        raise SourceError(f"unsupported SOURCE file {path}; accepted: {ACCEPTED}")
    raise SourceError(
        f"SOURCE {source!r} is no existing path nor module:factory; accepted: {ACCEPTED}"
    )


# ---------------------------------------------------------------------------- .onnx sources


def _convert_onnx(path: Path, task: str | None) -> Converted:
    _check_onnx(path, SourceError)
    return Converted(path, f"onnx:{path}", sample_inputs_for(path), None, task, "onnx")


# ---------------------------------------------------------------------------- sample inputs


# ---------------------------------------------------------------------------- factory sources


def _convert_factory(
    source: str, workdir: Path, task: str | None, opset: int, exporter: Exporter
) -> Converted:
    torch = _require("torch", f"SOURCE {source!r} (a torch factory)")
    module, inputs, axes = _call_factory(source)
    module.eval()
    inputs = _ordered_inputs(module, inputs)
    try:
        with torch.no_grad():
            outputs = _named_outputs(module(**inputs))
    except Exception as exc:  # the user's forward may raise anything
        raise SourceError(
            f"the model of {source!r} fails on its own inputs: {_short(exc)}"
        ) from exc
    if not outputs:
        raise SourceError(f"the model of {source!r} returned no tensor; it must return tensors")
    axes = axes if axes is not None else _default_axes(inputs, outputs)
    target = workdir / "torch" / "model.onnx"
    used = _torch_export(module, inputs, [n for n, _ in outputs], axes, target, opset, exporter)
    log.info("exported %s with %s", source, used)
    _check_onnx(target, ExportError)
    samples = sample_inputs_for(target)
    reference = _reference(module, samples, _output_names(target))
    # the verification step loads the ONNX model next: never hold both
    del module, inputs, outputs
    gc.collect()
    return Converted(target, f"torch:{source}", samples, reference, task, used)


def _call_factory(
    source: str,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, dict[int, str]] | None]:
    module_name, _, attribute = source.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # a user module may raise anything while importing
        raise SourceError(
            f"cannot import module {module_name!r} of SOURCE {source!r}: {exc}; "
            "accepted: 'module.path:factory' with the module importable from sys.path"
        ) from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise SourceError(f"SOURCE {source!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise SourceError(f"SOURCE {source!r} names a {type(target).__name__}, not a callable")
    try:
        result = target()
    except Exception as exc:
        raise SourceError(f"factory {source!r} raised {_short(exc)}") from exc
    return _check_factory_result(source, result)


def _check_factory_result(
    source: str, result: Any
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, dict[int, str]] | None]:
    import torch

    accepted = (
        "accepted: (torch.nn.Module, dict[str, torch.Tensor]) or "
        "(module, inputs, dict[str, dict[int, str] | list[int]])"
    )
    if not isinstance(result, tuple | list) or len(result) not in (2, 3):
        raise SourceError(f"factory {source!r} returned {type(result).__name__}; {accepted}")
    module, inputs = result[0], result[1]
    if not isinstance(module, torch.nn.Module):
        raise SourceError(
            f"factory {source!r} returned a {type(module).__name__} as model; {accepted}"
        )
    if (
        not isinstance(inputs, Mapping)
        or not inputs
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in inputs.items())
    ):
        raise SourceError(f"factory {source!r} returned inputs that are no tensor dict; {accepted}")
    axes = result[2] if len(result) == 3 else None
    return module, dict(inputs), None if axes is None else _normalise_axes(source, axes, accepted)


def _normalise_axes(source: str, axes: Any, accepted: str) -> dict[str, dict[int, str]]:
    if not isinstance(axes, Mapping):
        raise SourceError(
            f"factory {source!r} returned dynamic_axes of {type(axes).__name__}; {accepted}"
        )
    normal: dict[str, dict[int, str]] = {}
    for name, dims in axes.items():
        if isinstance(dims, Mapping):
            normal[str(name)] = {int(axis): str(label) for axis, label in dims.items()}
        elif isinstance(dims, list | tuple):
            normal[str(name)] = {int(axis): f"{name}_dim{axis}" for axis in dims}
        else:
            raise SourceError(f"factory {source!r}: dynamic_axes[{name!r}] is bad; {accepted}")
    return normal
