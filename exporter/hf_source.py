"""Hugging Face model folders: the task from the config, optimum's exporter first, then
``torch.onnx.export`` of the loaded model."""

from __future__ import annotations

import gc
import inspect
import json
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from exporter.converted import (
    ACCEPTED,
    DEFAULT_VOCAB,
    Converted,
    Exporter,
    _check_onnx,
    _fresh_dir,
    _output_names,
    _short,
)
from exporter.errors import ExportError, MissingExtra, SourceError, UnsupportedTask
from exporter.extras import INSTALL_HINT, _offline, _require
from exporter.samples import _padded_mask, sample_inputs_for
from exporter.torch_export import (
    _EXAMPLE_BATCH,
    _EXAMPLE_SEQUENCE,
    _default_axes,
    _named_outputs,
    _ordered_inputs,
    _reference,
    _torch_export,
)

log = logging.getLogger(__name__)

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
