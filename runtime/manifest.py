"""The model package manifest (DESIGN.md "Model package") and the digest that names its bytes.

Layout: ``{model-repo}/{name}/{version}/manifest.json`` + ``segment-{k}.onnx``; a folder holding a
plain ``model.onnx`` is a package of one segment. The digest is sha256 over the raw 32-byte
sha256 of every segment file, in segment order, written ``sha256:<hex>``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import ModelLoadError

MANIFEST_FILE = "manifest.json"
PLAIN_MODEL_FILE = "model.onnx"
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: list[int]  # -1 marks a variable dim


@dataclass(frozen=True)
class SegmentInfo:
    file: str
    bytes: int
    sha256: str
    inputs: list[str]
    outputs: list[str]
    # external data files of this segment (relative to the version folder), hashed too
    external_data: list[str] = field(default_factory=list)


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @staticmethod
    def from_dict(raw: dict[str, Any], where: str) -> Manifest:
        try:
            return Manifest(
                name=str(raw["name"]),
                version=int(raw["version"]),
                digest=str(raw["digest"]),
                opset=int(raw.get("opset", 0)),
                source=str(raw.get("source", "")),
                inputs=[TensorInfo(**t) for t in raw["inputs"]],
                outputs=[TensorInfo(**t) for t in raw["outputs"]],
                segments=[SegmentInfo(**s) for s in raw["segments"]],
                default_stages=[list(map(int, s)) for s in raw.get("default_stages", [])],
                verification=dict(raw.get("verification", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"{where}: manifest is not valid ({exc!r}); see DESIGN.md"
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
