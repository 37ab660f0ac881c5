"""Model packages on disk and the span of segments a node runs as one unit.

A package is ``{repo}/{name}/{version}/`` holding ``manifest.json`` + ``segment-{k}.onnx``, or a
plain ``model.onnx`` (a package of one segment). A span (first..last segment) runs as a chain of
sessions in one process: with spinning thread pools off, chaining costs nothing measurable
(docs/design.md, "Facts"), and every segment keeps its own file so nodes can fetch and hash it
alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import InvalidRequest, ModelLoadError, ModelNotFound
from runtime.manifest import (
    MANIFEST_FILE,
    PLAIN_MODEL_FILE,
    Manifest,
    SegmentInfo,
    package_digest,
    read_manifest,
    segment_hash,
)
from runtime.session import ModelSession, SessionSettings, create_session
from runtime.signature import Signature, TensorSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackageRef:
    """Where a package lies and what it holds, read from disk without loading any session."""

    name: str
    version: int
    folder: Path
    digest: str
    segments: list[SegmentInfo]
    manifest: Manifest | None  # None for a plain model.onnx


def list_repository(repo: Path) -> dict[str, list[int]]:
    """Model name -> its versions (ascending) that hold a manifest or a model.onnx."""
    found: dict[str, list[int]] = {}
    if not repo.is_dir():
        return found
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
        if model_dir.name.startswith("."):
            continue
        versions = sorted(
            int(v.name)
            for v in model_dir.iterdir()
            if v.is_dir()
            and v.name.isdigit()
            and ((v / MANIFEST_FILE).is_file() or (v / PLAIN_MODEL_FILE).is_file())
        )
        if versions:
            found[model_dir.name] = versions
    return found


def open_package(repo: Path, name: str, version: int | None = None) -> PackageRef:
    """The package of ``name`` at ``version`` (highest when None); ModelNotFound if absent."""
    versions = list_repository(repo).get(name)
    if not versions:
        raise ModelNotFound(
            f"no model {name!r} in repository {repo}; it holds "
            f"{', '.join(list_repository(repo)) or 'nothing'}"
        )
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        raise ModelNotFound(
            f"model {name!r} has no version {chosen}; versions: {', '.join(map(str, versions))}"
        )
    folder = repo / name / str(chosen)
    if (folder / MANIFEST_FILE).is_file():
        manifest = read_manifest(folder)
        return PackageRef(name, chosen, folder, manifest.digest, manifest.segments, manifest)
    onnx_file = folder / PLAIN_MODEL_FILE
    sha = segment_hash(folder, PLAIN_MODEL_FILE, [])
    segment = SegmentInfo(PLAIN_MODEL_FILE, onnx_file.stat().st_size, sha, [], [])
    return PackageRef(name, chosen, folder, package_digest([sha]), [segment], None)


def verify_segment(package: PackageRef, index: int) -> None:
    """Check a segment's bytes against the manifest's sha256 (refuse tampered or torn files)."""
    segment = package.segments[index]
    try:
        actual = segment_hash(package.folder, segment.file, segment.external_data)
    except OSError as exc:
        raise ModelLoadError(f"{package.folder / segment.file}: cannot read ({exc})") from exc
    if actual != segment.sha256:
        raise ModelLoadError(
            f"{package.folder / segment.file}: sha256 {actual} does not match the manifest's "
            f"{segment.sha256}; the file is corrupt or from another export"
        )


class SpanRunner:
    """Runs segments first..last in order, each reading what it needs from earlier outputs."""

    def __init__(self, sessions: list[ModelSession]) -> None:
        if not sessions:
            raise ModelLoadError("a span needs at least one segment")
        self.sessions = sessions
        self.signature = _span_signature(sessions)
        self._output_names = self.signature.output_names()
        self._bytes_inputs = [s.name for s in self.signature.inputs if s.datatype == "BYTES"]
        self._bytes_outputs = {s.name for s in self.signature.outputs if s.datatype == "BYTES"}

    @property
    def device(self) -> str:
        return self.sessions[0].device

    def run(
        self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = outputs or self._output_names
        if self._bytes_inputs:
            feeds = {**feeds, **{n: _to_str(n, feeds[n]) for n in self._bytes_inputs if n in feeds}}
        if len(self.sessions) == 1:
            result = dict(zip(names, self.sessions[0].run(feeds, names), strict=True))
        else:
            env = dict(feeds)
            for session in self.sessions:
                wanted = [spec.name for spec in session.signature.inputs]
                produced = session.run({k: env[k] for k in wanted})
                env.update(zip(session.signature.output_names(), produced, strict=True))
            result = {name: env[name] for name in names}
        for name in self._bytes_outputs.intersection(result):
            result[name] = _to_bytes(result[name])
        return result


# onnxruntime's Python binding takes and gives string tensors as UTF-8 ``str`` (it would str() a
# ``bytes`` object into "b'...'"), while the v2 codec carries BYTES as ``bytes``.
def _to_str(name: str, array: np.ndarray) -> np.ndarray:
    try:
        flat = [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in array.ravel()]
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"BYTES input {name} holds bytes that are not UTF-8 ({exc.reason} at byte "
            f"{exc.start}); onnxruntime string tensors take UTF-8 text only"
        ) from None
    return np.array(flat, dtype=object).reshape(array.shape)


def _to_bytes(array: np.ndarray) -> np.ndarray:
    flat = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in array.ravel()]
    return np.array(flat, dtype=object).reshape(array.shape)


def _span_signature(sessions: list[ModelSession]) -> Signature:
    produced: set[str] = set()
    inputs: list[TensorSpec] = []
    for session in sessions:
        inputs.extend(
            s for s in session.signature.inputs if s.name not in produced and s not in inputs
        )
        produced.update(session.signature.output_names())
    return Signature(inputs=tuple(inputs), outputs=sessions[-1].signature.outputs)


def load_span(
    package: PackageRef,
    settings: SessionSettings,
    first: int = 0,
    last: int | None = None,
    verify: bool = True,
    progress: Callable[[str], None] | None = None,
) -> SpanRunner:
    """Load segments first..last (inclusive; default all) of a package as one runner."""
    last = len(package.segments) - 1 if last is None else last
    if not 0 <= first <= last < len(package.segments):
        raise ModelLoadError(
            f"span {first}..{last} is outside {package.name} v{package.version}'s "
            f"{len(package.segments)} segment(s)"
        )
    sessions = []
    for index in range(first, last + 1):
        if progress is not None:
            done = index - first
            progress(
                f"loading {package.name} v{package.version} segment {index} "
                f"({done + 1}/{last - first + 1}, {package.segments[index].bytes / 2**20:.0f} MiB)"
            )
        if verify and package.manifest is not None:  # a plain model.onnx was hashed at open
            verify_segment(package, index)
        path = package.folder / package.segments[index].file
        sessions.append(create_session(path, settings))
    log.info(
        "loaded %s v%s segments %d..%d on %s",
        package.name,
        package.version,
        first,
        last,
        sessions[0].device,
    )
    return SpanRunner(sessions)


def plain_manifest(package: PackageRef) -> Manifest:
    """A manifest for a plain ``model.onnx`` package (one segment), read from the graph alone,
    so a coordinator can place and ship it like an exported package."""
    import onnx
    from onnx import helper

    from runtime.datatypes import v2_datatype
    from runtime.manifest import TensorInfo

    segment = package.segments[0]
    graph = onnx.load(str(package.folder / segment.file), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}

    def info(value: onnx.ValueInfoProto) -> TensorInfo:
        tensor = value.type.tensor_type
        try:
            datatype = v2_datatype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except (KeyError, TypeError) as exc:
            raise ModelLoadError(
                f"{value.name} of {package.folder} cannot be served: {exc}"
            ) from exc
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return TensorInfo(value.name, datatype, shape)

    inputs = [info(v) for v in graph.input if v.name not in weights]
    outputs = [info(v) for v in graph.output]
    with_names = SegmentInfo(
        segment.file,
        segment.bytes,
        segment.sha256,
        [i.name for i in inputs],
        [o.name for o in outputs],
        segment.external_data,
    )
    return Manifest(
        name=package.name,
        version=package.version,
        digest=package.digest,
        opset=0,
        source=f"onnx:{package.folder / segment.file}",
        inputs=inputs,
        outputs=outputs,
        segments=[with_names],
        default_stages=[[0, 0]],
    )
