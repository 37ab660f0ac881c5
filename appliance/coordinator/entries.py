"""The packages a coordinator can place: a manifest, its signature and its segment sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.manifest import Manifest
from runtime.package import PackageRef, open_package, plain_manifest
from runtime.signature import Signature, TensorSpec


@dataclass
class ModelEntry:
    package: PackageRef
    manifest: Manifest
    signature: Signature

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def version(self) -> str:
        return str(self.package.version)

    @property
    def digest(self) -> str:
        return self.package.digest

    @property
    def sizes(self) -> list[int]:
        return [s.bytes for s in self.manifest.segments]

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [s.as_dict() for s in self.signature.inputs],
            "outputs": [s.as_dict() for s in self.signature.outputs],
            "parameters": {"digest": self.digest, "segments": len(self.sizes)},
        }


def open_entry(repo: Path, name: str, version: int | None = None) -> ModelEntry:
    """The package of ``name`` (its highest version by default); ModelNotFound if absent."""
    package = open_package(repo, name, version)
    manifest = package.manifest or plain_manifest(package)  # a plain model.onnx: 1 segment
    signature = Signature(
        inputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in manifest.inputs),
        outputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in manifest.outputs),
    )
    return ModelEntry(package, manifest, signature)
