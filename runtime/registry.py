"""The models held by one node: load (preload and warm before ready), unload, hot swap."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from runtime.batcher import BatchSettings, DynamicBatcher, Tensors
from runtime.datatypes import V2_TO_TRITON_CONFIG
from runtime.deadline import Deadline
from runtime.errors import ModelLoadError, ModelNotFound, ModelNotReady, RuntimeFailure
from runtime.package import PackageRef, SpanRunner, list_repository, load_span, open_package
from runtime.session import SessionSettings
from runtime.signature import Signature, TensorSpec, sample_inputs
from runtime.stats import ModelStats

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True)
class WarmupSettings:
    enabled: bool = True
    dynamic_dim: int = 16  # value given to variable non-batch dims (e.g. sequence length)


@dataclass
class LoadedModel:
    """One model version, loaded and warmed, with its batcher: what infer calls reach."""

    package: PackageRef
    runner: SpanRunner
    batcher: DynamicBatcher
    stats: ModelStats
    warmup_runs: int = 0  # session runs done before the model was reported ready
    span: tuple[int, int] = (0, 0)  # first and last segment held (the whole model: 0..n-1)
    loaded_at: float = field(default_factory=time.time)

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
    def signature(self) -> Signature:
        return self.runner.signature

    async def infer(
        self, inputs: Tensors, outputs: list[str] | None, deadline: Deadline | None
    ) -> Tensors:
        return await self.batcher.infer(inputs, outputs, deadline)

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": PLATFORM,
            "inputs": [spec.as_dict() for spec in self.signature.inputs],
            "outputs": [spec.as_dict() for spec in self.signature.outputs],
            "parameters": {
                "digest": self.digest,
                "device": self.runner.device,
                "segments": len(self.runner.sessions),
                "warmup_runs": self.warmup_runs,
            },
        }

    def config(self) -> dict[str, Any]:
        """Triton's model configuration shape (dims exclude the batch dim when batching)."""
        return triton_config(
            self.name,
            self.signature,
            self.digest,
            self.batcher.settings if self.batcher.batching else None,
            "KIND_GPU" if self.runner.device == "cuda" else "KIND_CPU",
        )


def triton_config(
    name: str,
    signature: Signature,
    digest: str,
    batching: BatchSettings | None,
    kind: str = "KIND_CPU",
) -> dict[str, Any]:
    """A model's configuration in Triton's shape (``data_type`` as ``TYPE_FP32``, ``dims``
    without the batch dim when batching, ``max_batch_size`` 0 when not), as clients read it."""

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        dims = list(spec.shape[1:] if batching else spec.shape)
        return {"name": spec.name, "data_type": V2_TO_TRITON_CONFIG[spec.datatype], "dims": dims}

    config: dict[str, Any] = {
        "name": name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": batching.max_batch_size if batching else 0,
        "input": [tensor(s) for s in signature.inputs],
        "output": [tensor(s) for s in signature.outputs],
        "instance_group": [{"count": 1, "kind": kind}],
        "parameters": {"digest": {"string_value": digest}},
    }
    if batching:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "default_queue_policy": {"max_queue_size": batching.max_queue_size},
        }
    return config


@dataclass
class _Slot:
    """A model name's state in the registry: what serves now and what is loading."""

    state: str = "UNAVAILABLE"  # READY | LOADING | UNLOADING | UNAVAILABLE
    reason: str = ""
    serving: LoadedModel | None = None


class ModelRegistry:
    def __init__(
        self,
        repo: Path,
        session_settings: SessionSettings,
        batch_settings: BatchSettings,
        warmup: WarmupSettings = WarmupSettings(),
        drain_timeout_s: float = 30.0,
    ) -> None:
        self.repo = repo
        self.session_settings = session_settings
        self.batch_settings = batch_settings
        self.warmup = warmup
        self.drain_timeout_s = drain_timeout_s
        self._slots: dict[str, _Slot] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.generation = 0  # counts loads and unloads: tells fresh reports from stale ones
        # (model, seconds queued, seconds computing) per answered request, for metrics
        self.observe: Callable[[str, float, float], None] | None = None
        self.progress: Callable[[str], None] | None = None  # a line per segment loaded

    def names(self) -> list[str]:
        return sorted(self._slots)

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        slot = self._slots.get(name)
        if slot is None:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"unknown model {name!r}; models: {known}")
        model = slot.serving
        if model is None:
            raise ModelNotReady(f"model {name!r} is {slot.state}: {slot.reason or 'not loaded'}")
        if version is not None and version != model.version:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r} loaded; loaded: {model.version}"
            )
        return model

    def is_ready(self, name: str, version: str | None = None) -> bool:
        try:
            self.get(name, version)
        except RuntimeFailure:
            return False
        return True

    def all_ready(self) -> bool:
        return bool(self._slots) and all(s.serving is not None for s in self._slots.values())

    def loaded(self) -> list[LoadedModel]:
        return [s.serving for s in self._slots.values() if s.serving is not None]

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: every model on disk and every model held."""
        rows: list[dict[str, Any]] = []
        on_disk = list_repository(self.repo)
        for name in sorted(set(on_disk) | set(self._slots)):
            slot = self._slots.get(name)
            versions: list[int | None] = [*on_disk.get(name, [])] or [None]
            for version in versions:
                row: dict[str, Any] = {"name": name}
                if version is not None:
                    row["version"] = str(version)
                serving = slot.serving if slot else None
                if serving is not None and serving.version == str(version):
                    row["state"], row["reason"] = "READY", ""
                elif slot is not None and slot.state in ("LOADING", "UNAVAILABLE"):
                    row["state"], row["reason"] = slot.state, slot.reason
                else:
                    row["state"], row["reason"] = "UNAVAILABLE", "unloaded"
                rows.append(row)
        return rows

    async def load(
        self,
        name: str,
        version: int | None = None,
        span: tuple[int, int] | None = None,
        slot_name: str | None = None,
    ) -> LoadedModel:
        """Load, warm, then swap in atomically; the old version serves until the new is warm.

        ``span`` (first, last segment) loads part of the package; ``slot_name`` (default: the
        model name) is the key it is served under, so one node may hold spans of one model.
        """
        key = slot_name or name
        async with self._locks.setdefault(key, asyncio.Lock()):
            slot = self._slots.setdefault(key, _Slot())
            previous_state = slot.state
            slot.state, slot.reason = "LOADING", ""
            try:
                model = await asyncio.to_thread(self._build, name, version, span)
            except RuntimeFailure as exc:
                slot.reason = str(exc)
                slot.state = "READY" if slot.serving is not None else "UNAVAILABLE"
                log.error("loading %s failed: %s", name, exc)
                raise
            except Exception as exc:  # a bug or an unexpected onnxruntime failure
                slot.state = previous_state if slot.serving else "UNAVAILABLE"
                slot.reason = f"unexpected error: {exc}"
                raise ModelLoadError(f"loading {name} failed: {exc}") from exc
            model.batcher.start()
            old, slot.serving = slot.serving, model
            slot.state, slot.reason = "READY", ""
            self.generation += 1
            log.info("model %s v%s ready (digest %s)", name, model.version, model.digest)
            if old is not None:
                asyncio.get_running_loop().create_task(old.batcher.drain(self.drain_timeout_s))
            return model

    async def unload(self, name: str) -> None:
        async with self._locks.setdefault(name, asyncio.Lock()):
            slot = self._slots.get(name)
            if slot is None:
                raise ModelNotFound(f"unknown model {name!r}; models: {', '.join(self.names())}")
            old, slot.serving = slot.serving, None
            slot.state, slot.reason = "UNAVAILABLE", "unloaded"
            self.generation += 1
            if old is not None:
                await old.batcher.drain(self.drain_timeout_s)

    async def close(self) -> None:
        for slot in self._slots.values():
            if slot.serving is not None:
                await slot.serving.batcher.drain(self.drain_timeout_s)
                slot.serving = None

    def _build(self, name: str, version: int | None, span: tuple[int, int] | None) -> LoadedModel:
        """On a worker thread: open the package, build the span, warm it up."""
        package = open_package(self.repo, name, version)
        first, last = span if span is not None else (0, len(package.segments) - 1)
        runner = load_span(package, self.session_settings, first, last, progress=self.progress)
        warmup_runs = self._warm(runner, name) if self.warmup.enabled else 0
        stats = ModelStats()
        batcher = DynamicBatcher(
            runner.run,
            self.batch_settings,
            batchable=runner.signature.batchable,
            name=name,
            stats=stats,
            observe=partial(self.observe, name) if self.observe is not None else None,
        )
        return LoadedModel(package, runner, batcher, stats, warmup_runs, (first, last))

    def _warm(self, runner: SpanRunner, name: str) -> int:
        """Run the shapes real traffic will bring, so the first request pays no allocation."""
        batches = {1}
        if runner.signature.batchable:
            batches.add(max(1, self.batch_settings.max_batch_size))
        started = time.perf_counter()
        for batch in sorted(batches):
            feeds = sample_inputs(runner.signature, batch, self.warmup.dynamic_dim)
            try:
                runner.run(feeds)
            except Exception as exc:
                raise ModelLoadError(
                    f"warm-up of {name} failed on zero inputs of batch {batch} "
                    f"(variable dims = {self.warmup.dynamic_dim}): {exc}; set warmup = false "
                    "to skip it"
                ) from exc
        log.info(
            "warmed %s (batches %s) in %.2fs", name, sorted(batches), time.perf_counter() - started
        )
        return len(batches)
