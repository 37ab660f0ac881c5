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
import inspect
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporter.errors import ExportError, MissingExtra, SourceError, UnsupportedTask

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_SIZES: list[tuple[int, int]] = [(1, 8), (2, 16), (3, 5)]
DEFAULT_VOCAB = 100
ACCEPTED = (
    "an existing .onnx file, a Hugging Face model folder (with config.json), or "
    "'module.path:factory' (a callable returning (torch.nn.Module, dict[str, torch.Tensor]) or "
    "(module, inputs, dynamic_axes))"
)
INSTALL_HINT = (
    "install the export extra: pip install 'onnx-appliance[export]' (on these machines "
    "torch==2.13.0 is the local CPU build; any other torch version downloads gigabytes)"
)
Exporter = Literal["auto", "optimum", "dynamo", "torchscript"]
EXPORTERS: tuple[str, ...] = ("auto", "optimum", "dynamo", "torchscript")

_FACTORY = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# protobuf cannot serialise 2 GiB; keep headroom for the graph next to the weights
_EXTERNAL_DATA_BYTES = 1_800_000_000
# the dynamo exporter emits opset 18 and its down-conversion to 17 fails on transformer graphs
_DYNAMO_MIN_OPSET = 18
# odd example sizes: an output whose dim 1 equals this is very likely the sequence axis
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE = 2, 13

# single-graph tasks only: seq2seq writes several graphs, "-with-past" needs a KV cache per span
_TASK_LOADERS: dict[str, str] = {
    "feature-extraction": "AutoModel",
    "fill-mask": "AutoModelForMaskedLM",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "text-generation": "AutoModelForCausalLM",
}
# config.json "architectures" suffix -> task; first match wins ("LMHeadModel" before "Model")
_ARCHITECTURE_TASKS: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("Model", "feature-extraction"),
)


@dataclass
class Converted:
    """The whole model as ONNX plus what the verification step compares it against."""

    onnx_path: Path  # external data, if any, lies beside it
    source: str  # for the manifest: "hf:<folder>", "torch:<module:factory>", "onnx:<path>"
    samples: list[dict[str, np.ndarray]]  # keyed by ONNX input name
    reference: list[dict[str, np.ndarray]] | None  # PyTorch's outputs by ONNX output name
    task: str | None
    exporter: str = ""  # "optimum", "torch.onnx-dynamo", "torch.onnx-torchscript" or "onnx"


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


# ---------------------------------------------------------------------------- sample inputs


def sample_inputs_for(
    model: onnx.ModelProto | Path,
    sizes: list[tuple[int, int]] = DEFAULT_SIZES,
    vocab: int | None = None,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """One feed per (batch, sequence) size for the ONNX graph inputs; fixed dims are kept.

    Token ids lie in [0, vocab) (vocab, else the rows of the embedding the input indexes, else
    100); attention masks pad the last 2 positions of row 1; float inputs are N(0, 1).
    """
    proto = model if isinstance(model, onnx.ModelProto) else _load_graph(Path(model))
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    rng = np.random.default_rng(seed)
    samples = []
    for batch, sequence in sizes:
        if batch < 1 or sequence < 1:
            raise ExportError(f"sample size ({batch}, {sequence}) must be positive")
        named: dict[str, int] = {}  # one size per symbolic dim name within a sample
        feeds = {}
        for value in inputs:
            elem, shape = _input_shape(value, batch, sequence, named)
            high = vocab or _gather_rows(graph, value.name) or DEFAULT_VOCAB
            feeds[value.name] = _sample_value(value.name, elem, shape, high, rng)
        samples.append(feeds)
    return samples


def _input_shape(
    value: onnx.ValueInfoProto, batch: int, sequence: int, named: dict[str, int]
) -> tuple[int, tuple[int, ...]]:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
        raise ExportError(
            f"cannot make a sample for input {value.name!r}: only tensor inputs of known rank "
            "are accepted"
        )
    shape = []
    for axis, dim in enumerate(tensor.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
            continue
        key = dim.dim_param
        if key and key in named:
            shape.append(named[key])
            continue
        size = _guess_size(key, axis, batch, sequence)
        if key:
            named[key] = size
        shape.append(size)
    return tensor.elem_type, tuple(shape)


def _guess_size(dim_name: str, axis: int, batch: int, sequence: int) -> int:
    lowered = dim_name.lower()
    if "batch" in lowered:
        return batch
    if any(word in lowered for word in ("seq", "len", "token")):
        return sequence
    return batch if axis == 0 else sequence


def _gather_rows(graph: onnx.GraphProto, name: str) -> int | None:
    """Rows of the embedding table that ``name`` indexes directly, if any (its vocab size)."""
    tables = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
            table = tables.get(node.input[0])
            if table is not None and table.dims:
                return int(table.dims[0])
    return None


def _sample_value(
    name: str, elem: int, shape: tuple[int, ...], high: int, rng: np.random.Generator
) -> np.ndarray:
    if elem in (TensorProto.STRING, TensorProto.UNDEFINED, TensorProto.BFLOAT16):
        raise ExportError(
            f"cannot make a sample for input {name!r} of ONNX type "
            f"{TensorProto.DataType.Name(elem)}; accepted: bool, integer and float16/32/64"
        )
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    lowered = name.lower()
    if dtype == np.bool_:
        return np.ones(shape, dtype=np.bool_)
    if np.issubdtype(dtype, np.integer):
        if "attention_mask" in lowered:
            return _padded_mask(shape, dtype)
        if "token_type_ids" in lowered:
            return np.zeros(shape, dtype=dtype)
        if "position_ids" in lowered and shape:
            return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        high = min(high, int(np.iinfo(dtype).max) + 1)
        return rng.integers(0, high, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    raise ExportError(f"cannot make a sample for input {name!r} of numpy type {dtype}")


def _padded_mask(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    mask = np.ones(shape, dtype=dtype)
    # right padding in row 1 exercises the masked path; one real token stays
    if len(shape) >= 2 and shape[0] > 1 and shape[-1] > 1:
        mask[1, ..., -min(2, shape[-1] - 1) :] = 0
    return mask


# ---------------------------------------------------------------------------- optional extras


def _require(module: str, needed_by: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(
            f"{needed_by} needs {module}, which cannot be imported ({exc}); {INSTALL_HINT}"
        ) from exc


@contextmanager
def _offline() -> Iterator[None]:
    """Never reach the Hugging Face hub: the machines have no network but PyPI."""
    saved = {name: os.environ.get(name) for name in _OFFLINE_VARS}
    os.environ.update({name: "1" for name in _OFFLINE_VARS})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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


# ---------------------------------------------------------------------------- Hugging Face folders


def _convert_hf(
    folder: Path, workdir: Path, task: str | None, opset: int, exporter: Exporter
) -> Converted:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(
            f"not a Hugging Face model folder: no config.json in {folder}; accepted: {ACCEPTED}"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise SourceError(f"{config_path} holds no JSON object")
    _require("torch", f"Hugging Face folder {folder}")
    transformers = _require("transformers", f"Hugging Face folder {folder}")
    task = _resolve_task(task, config)
    with _offline():
        onnx_path, used, model = _export_hf(transformers, folder, workdir, task, opset, exporter)
        log.info("exported %s (%s) with %s", folder, task, used)
        _check_onnx(onnx_path, ExportError)
        samples = sample_inputs_for(onnx_path, vocab=_config_vocab(config))
        reference = _reference(model, samples, _output_names(onnx_path))
    # the verification step loads the ONNX model next: never hold both
    del model
    gc.collect()
    return Converted(onnx_path, f"hf:{folder}", samples, reference, task, used)


def _resolve_task(task: str | None, config: dict[str, Any]) -> str:
    if task is None:
        task = _task_from_architectures(config.get("architectures"))
    if task.endswith("-with-past"):
        raise UnsupportedTask(
            f"task {task!r} needs a KV cache, which is not supported yet; "
            f"use {task.removesuffix('-with-past')!r} (one forward pass)"
        )
    if task not in _TASK_LOADERS:
        raise UnsupportedTask(
            f"task {task!r} cannot be exported as one graph; accepted: {', '.join(_TASK_LOADERS)}"
        )
    return task


def _task_from_architectures(architectures: Any) -> str:
    names = [a for a in architectures or [] if isinstance(a, str)]
    for name in names:
        for suffix, task in _ARCHITECTURE_TASKS:
            if name.endswith(suffix):
                log.info("task %s inferred from architecture %s", task, name)
                return task
    log.info("no task known for architectures %s; using feature-extraction", names)
    return "feature-extraction"


def _config_vocab(config: dict[str, Any]) -> int | None:
    for section in (config, config.get("text_config") or {}):
        vocab = section.get("vocab_size") if isinstance(section, dict) else None
        if isinstance(vocab, int) and vocab > 0:
            return vocab
    return None


def _export_hf(
    transformers: ModuleType,
    folder: Path,
    workdir: Path,
    task: str,
    opset: int,
    exporter: Exporter,
) -> tuple[Path, str, Any]:
    """The ONNX file, the path that wrote it, and the PyTorch model (for the reference)."""
    failures = []
    onnx_path: Path | None = None
    if exporter in ("auto", "optimum"):
        try:
            onnx_path = _export_optimum(folder, workdir / "optimum", task, opset)
        except ImportError as exc:
            if exporter == "optimum":
                raise MissingExtra(
                    f"exporter 'optimum' needs optimum-onnx ({exc}); {INSTALL_HINT}"
                ) from exc
            log.info("optimum is unavailable (%s); exporting with torch.onnx", exc)
        except Exception as exc:  # optimum raises many untyped errors; torch.onnx may still work
            if exporter == "optimum":
                raise ExportError(f"optimum could not export {folder}: {_short(exc)}") from exc
            log.warning("optimum failed (%s); exporting with torch.onnx", _short(exc))
            failures.append(f"optimum: {_short(exc)}")
    model = _load_hf_model(transformers, folder, task)
    if onnx_path is not None:
        return onnx_path, "optimum", model
    try:
        onnx_path, used = _export_hf_torch(model, workdir / "torch", opset, exporter)
    except ExportError as exc:
        raise ExportError(f"cannot export {folder}: " + " | ".join([*failures, str(exc)])) from exc
    return onnx_path, used, model


def _export_optimum(folder: Path, out: Path, task: str, opset: int) -> Path:
    from optimum.exporters.onnx import main_export

    _fresh_dir(out)
    main_export(
        str(folder),
        output=out,
        task=task,
        opset=opset,
        device="cpu",
        # a folder with sentence-transformers files would otherwise be exported through that
        # library, which reaches for the hub
        library_name="transformers",
        local_files_only=True,
        do_validation=False,  # the package writer verifies against our own reference
    )
    written = sorted(p.name for p in out.glob("*.onnx"))
    if written != ["model.onnx"]:
        raise ExportError(f"optimum wrote {written}; accepted: one graph, model.onnx")
    return out / "model.onnx"


def _load_hf_model(transformers: ModuleType, folder: Path, task: str) -> Any:
    loader = getattr(transformers, _TASK_LOADERS[task])
    try:
        model = loader.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise SourceError(
            f"cannot load {folder} with transformers.{_TASK_LOADERS[task]}: {_short(exc)}"
        ) from exc
    model.eval()
    # single pass: no past key values among the outputs
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def _export_hf_torch(model: Any, out: Path, opset: int, exporter: Exporter) -> tuple[Path, str]:
    import torch

    accepted = set(inspect.signature(model.forward).parameters)
    # Llama's mask building fails in TorchScript without attention_mask: always pass it
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in accepted and getattr(model.config, "type_vocab_size", None):
        names.append("token_type_ids")
    generator = torch.Generator().manual_seed(0)
    shape = (_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE)
    vocab = int(getattr(model.config, "vocab_size", None) or DEFAULT_VOCAB)
    examples = {
        "input_ids": torch.randint(0, vocab, shape, generator=generator),
        "attention_mask": torch.from_numpy(_padded_mask(shape, np.dtype(np.int64))),
        "token_type_ids": torch.zeros(shape, dtype=torch.int64),
    }
    inputs = _ordered_inputs(model, {name: examples[name] for name in names})
    with torch.no_grad():
        outputs = _named_outputs(model(**inputs))
    axes = _default_axes(inputs, outputs)
    target = out / "model.onnx"
    kind: Exporter = "auto" if exporter in ("auto", "optimum") else exporter
    used = _torch_export(model, inputs, [n for n, _ in outputs], axes, target, opset, kind)
    return target, used
