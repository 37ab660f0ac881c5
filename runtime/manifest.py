"""The model package manifest (docs/design.md "Model package") and the digest of its bytes.

Layout: ``{model-repo}/{name}/{version}/manifest.json`` + ``segment-{k}.onnx``; a folder holding a
plain ``model.onnx`` is a package of one segment. The digest is sha256 over the raw 32-byte
sha256 of every segment file, in segment order, written ``sha256:<hex>``.

Format 1 (no ``format`` key) is a single-pass package. Format 2 adds ``kind``: ``single_pass``
or ``generation``; a generation package is a decoder cut at block boundaries whose segments each
own their layers' KV cache (``SegmentInfo.kv``), with the tokenizer, chat template and
generation settings described by ``Manifest.generation``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.datatypes import numpy_dtype
from runtime.errors import ModelLoadError

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # what this code writes; it reads 1 and 2
KINDS = ("single_pass", "generation")
PLAIN_MODEL_FILE = "model.onnx"
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: list[int]  # -1 marks a variable dim

    def row_bytes(self) -> int:
        """Bytes of one row (the first dim is the batch), variable dims counted as 1: per
        token for a sequence dim. A BYTES element counts 1."""
        size = 1 if self.datatype == "BYTES" else numpy_dtype(self.datatype).itemsize
        for dim in self.shape[1:]:
            size *= max(dim, 1)
        return size


@dataclass(frozen=True)
class KvLayout:
    """The KV cache a generation segment owns: layers first_layer..first_layer+layers-1, each
    with a key and a value of [batch, kv_heads, past, head_dim] in ``dtype``."""

    first_layer: int
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "FP32"

    def bytes_per_token(self) -> int:
        itemsize = {"FP32": 4, "FP16": 2, "BF16": 2}.get(self.dtype, 4)
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize


@dataclass(frozen=True)
class SegmentInfo:
    file: str
    bytes: int
    sha256: str
    inputs: list[str]
    outputs: list[str]
    # external data files of this segment (relative to the version folder), hashed too
    external_data: list[str] = field(default_factory=list)
    kv: KvLayout | None = None  # generation packages only
    # what this segment hands the next per row (TensorInfo.row_bytes of its outputs): what a
    # cut after it sends over a link; None from exporters before it was recorded
    output_row_bytes: int | None = None

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> SegmentInfo:
        fields = dict(raw)
        kv = fields.pop("kv", None)
        return SegmentInfo(**fields, kv=KvLayout(**kv) if kv is not None else None)


@dataclass(frozen=True)
class GenerationInfo:
    """What a generation package needs besides its graphs (files relative to the folder)."""

    tokenizer: str  # tokenizer.json, read with the ``tokenizers`` library
    chat_template: str | None  # a jinja2 file, or None for a model without one
    eos_token_ids: list[int]  # every id that ends a sequence
    bos_token_id: int | None
    pad_token_id: int | None
    context_length: int  # positions the model was trained for
    vocab_size: int
    hidden_size: int
    num_layers: int
    dtype: str = "FP32"
    generation_config: str | None = None  # the source's generation_config.json, if any
    defaults: dict[str, Any] = field(default_factory=dict)  # e.g. temperature, top_p


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    digest: str
    opset: int
    source: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    segments: list[SegmentInfo]
    default_stages: list[list[int]]
    verification: dict[str, Any] = field(default_factory=dict)
    format: int = 1
    kind: str = "single_pass"
    generation: GenerationInfo | None = None

    @property
    def is_generation(self) -> bool:
        return self.kind == "generation"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @staticmethod
    def from_dict(raw: dict[str, Any], where: str) -> Manifest:
        form = raw.get("format", 1)
        kind = raw.get("kind", "single_pass")
        if form not in (1, FORMAT_VERSION):
            raise ModelLoadError(
                f"{where}: manifest format {form!r} is not readable here; accepted: 1, "
                f"{FORMAT_VERSION} (a newer exporter wrote it: upgrade onnx-appliance)"
            )
        if kind not in KINDS:
            raise ModelLoadError(
                f"{where}: package kind {kind!r} is not served here; accepted: {', '.join(KINDS)}"
            )
        generation = raw.get("generation")
        try:
            return Manifest(
                name=str(raw["name"]),
                version=int(raw["version"]),
                digest=str(raw["digest"]),
                opset=int(raw.get("opset", 0)),
                source=str(raw.get("source", "")),
                inputs=[TensorInfo(**t) for t in raw["inputs"]],
                outputs=[TensorInfo(**t) for t in raw["outputs"]],
                segments=[SegmentInfo.from_dict(s) for s in raw["segments"]],
                default_stages=[list(map(int, s)) for s in raw.get("default_stages", [])],
                verification=dict(raw.get("verification", {})),
                format=int(form),
                kind=str(kind),
                generation=GenerationInfo(**generation) if generation is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"{where}: manifest is not valid ({exc!r}); see docs/design.md, 'Model package'"
            ) from exc


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def package_digest(segment_hashes: list[str]) -> str:
    """sha256 over the raw segment hashes in order: the identity of a package's bytes."""
    digest = hashlib.sha256()
    for hex_hash in segment_hashes:
        digest.update(bytes.fromhex(hex_hash))
    return "sha256:" + digest.hexdigest()


def segment_hash(folder: Path, segment_file: str, external_data: list[str]) -> str:
    """The sha256 of a segment: its .onnx file, then each external data file, in order."""
    if not external_data:
        return file_sha256(folder / segment_file)
    digest = hashlib.sha256()
    for name in [segment_file, *external_data]:
        digest.update(bytes.fromhex(file_sha256(folder / name)))
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write manifest.json atomically (temp file, fsync, rename)."""
    tmp = folder / (MANIFEST_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(manifest.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / MANIFEST_FILE)


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read manifest ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: manifest must be a JSON object")
    return Manifest.from_dict(raw, str(path))
