"""What converting a SOURCE yields, and the small facts every kind of source shares."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from exporter.errors import ExportError

log = logging.getLogger(__name__)

DEFAULT_SIZES: list[tuple[int, int]] = [(1, 8), (2, 16), (3, 5)]
DEFAULT_VOCAB = 100
ACCEPTED = (
    "an existing .onnx file, a Hugging Face model folder (with config.json), or "
    "'module.path:factory' (a callable returning (torch.nn.Module, dict[str, torch.Tensor]) or "
    "(module, inputs, dynamic_axes))"
)
Exporter = Literal["auto", "optimum", "dynamo", "torchscript"]
EXPORTERS: tuple[str, ...] = ("auto", "optimum", "dynamo", "torchscript")


@dataclass
class Converted:
    """The whole model as ONNX plus what the verification step compares it against."""

    onnx_path: Path  # external data, if any, lies beside it
    source: str  # for the manifest: "hf:<folder>", "torch:<module:factory>", "onnx:<path>"
    samples: list[dict[str, np.ndarray]]  # keyed by ONNX input name
    reference: list[dict[str, np.ndarray]] | None  # PyTorch's outputs by ONNX output name
    task: str | None
    exporter: str = ""  # "optimum", "torch.onnx-dynamo", "torch.onnx-torchscript" or "onnx"


def _load_graph(path: Path) -> onnx.ModelProto:
    """The model without its external weights: enough for names, types and shapes."""
    return onnx.load(str(path), load_external_data=False)


def _check_onnx(path: Path, error: type[ExportError]) -> None:
    try:
        _load_graph(path)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise error(f"cannot parse ONNX file {path}: {type(exc).__name__}: {exc}") from exc
    try:
        # the path form also checks models over 2 GB and their external data files
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise error(f"ONNX file {path} fails onnx.checker: {exc}") from exc


def _output_names(path: Path) -> list[str]:
    return [o.name for o in _load_graph(path).graph.output]


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _short(exc: BaseException) -> str:
    """One readable line: torch.export's messages run to pages with the cause at the end."""
    text = str(exc)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1].split("(Refer to", 1)[0]
    text = " ".join(text.split())
    return f"{type(exc).__name__}: {text[:500]}"
