"""onnxruntime sessions: provider choice (asked for versus obtained), threads, optimisation level.

onnxruntime-gpu lists CUDA in ``get_available_providers()`` even where its CUDA libraries are
missing, and a session asked for CUDA then silently runs on CPU. So ``auto`` means "CUDA if the
session really got it" (read back with ``get_providers()``) and ``cuda`` not obtained is an error.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from runtime.errors import DeviceUnavailable, ModelLoadError
from runtime.signature import Signature, spec_from_node_arg

log = logging.getLogger(__name__)

Device = Literal["auto", "cuda", "cpu"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]
IoBinding = Literal["auto", "on", "off"]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# intra_op_threads: AUTO = the usable cores shared among the runs in flight (at least 1) on a CPU
# session, onnxruntime's default on a CUDA one; ORT_DEFAULT = onnxruntime's (one per core).
AUTO_THREADS = -1
ORT_DEFAULT_THREADS = 0

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# Distributions that each ship their own ``onnxruntime`` module; two of them in one environment
# overwrite each other's files, and uninstalling either breaks ``import onnxruntime``.
_ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-silicon",
)


@dataclass(frozen=True)
class SessionSettings:
    device: Device = "auto"
    # -1 (AUTO_THREADS) = the usable cores / runs in flight, at least 1, on CPU; 0 = onnxruntime's
    # default; N = N
    intra_op_threads: int = AUTO_THREADS
    inter_op_threads: int = 1
    graph_optimization: GraphOptimization = "all"
    # Spinning pools burn the cores between runs and starve the event loop and sibling
    # sessions (measured 2-6.6x slower chained runs on 2 cores): off unless asked.
    allow_spinning: bool = False
    cuda_device_id: int = 0
    # Runs of this session that may be in flight at once (the batcher's runs_in_flight): AUTO
    # threads share the cores among them.
    concurrent_runs: int = 1
    # Decode steps through onnxruntime IO binding, so that a decode batch's KV stays in the
    # session's memory between steps: auto = where the session got CUDA (on CPU, numpy in and
    # out costs no copy anyway), on = also on CPU, off = never
    decode_io_binding: IoBinding = "auto"
    # A CPU span holding part of a model: a second set of its sessions with this many threads
    # runs the steps that hold every open sequence of the span (a chain of local nodes serving
    # one cohort computes one span at a time, so the other nodes' cores are idle); 0 = none
    alone_intra_op_threads: int = 0


def conflicting_onnxruntime_installs() -> list[str]:
    """Names of the onnxruntime distributions installed side by side (empty when fine)."""
    found = []
    for dist in _ORT_DISTRIBUTIONS:
        try:
            found.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found if len(found) > 1 else []


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask: a cgroup's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def intra_op_threads_for(settings: SessionSettings, cuda: bool) -> int:
    """What onnxruntime is given. AUTO on CPU shares the cores this process may run on (its
    affinity: a cgroup's or taskset's share, which onnxruntime's own default ignores) among the
    runs in flight. Leaving one core to HTTP work instead (the default until 2026-12-04) won
    only on a machine shared with other work; on a quiet 2-core one a node served 0.67x
    (docs/performance.md, Hot path). On CUDA the pool only runs what falls back to CPU, so AUTO
    stays onnxruntime's default there."""
    if settings.intra_op_threads != AUTO_THREADS:
        return settings.intra_op_threads
    if cuda:
        return ORT_DEFAULT_THREADS
    return max(1, usable_cores() // max(1, settings.concurrent_runs))


def session_options(settings: SessionSettings, cuda: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads_for(settings, cuda)
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = _OPT_LEVELS[settings.graph_optimization]
    spin = "1" if settings.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    options.log_severity_level = 3  # errors only: warnings about unused initializers are noise
    return options


def _providers_to_ask(settings: SessionSettings) -> list[Any]:
    available = ort.get_available_providers()
    if settings.device == "cpu":
        return [CPU]
    if settings.device == "cuda" and CUDA not in available:
        raise DeviceUnavailable(
            f"device = cuda, but this onnxruntime ({ort.__version__}) offers only "
            f"{', '.join(available)}; install the gpu extra (onnxruntime-gpu) or set device = "
            "auto or cpu"
        )
    if CUDA in available:
        return [(CUDA, {"device_id": settings.cuda_device_id}), CPU]
    return [CPU]


@dataclass
class ModelSession:
    """One onnxruntime session with what was asked, what was obtained, and its signature."""

    session: ort.InferenceSession
    requested: list[str]
    obtained: list[str]
    signature: Signature
    source: str
    device_id: int = 0  # the CUDA device a CUDA session runs on

    @property
    def device(self) -> str:
        return "cuda" if CUDA in self.obtained else "cpu"

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[Any]:
        return self.session.run(outputs, feeds)

    def run_bound(
        self, feeds: dict[str, Any], host_outputs: list[str], kept_outputs: list[str]
    ) -> tuple[list[np.ndarray], list[ort.OrtValue]]:
        """One run through IO binding: ``feeds`` are numpy arrays (copied to the device by
        onnxruntime) or OrtValues of an earlier run (bound as they are); ``host_outputs`` come
        back as numpy arrays, ``kept_outputs`` as OrtValues left in the session's device memory."""
        binding = self.session.io_binding()
        held = []  # onnxruntime may read a bound array's memory in place: alive until the run ends
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                held.append(np.ascontiguousarray(value))
                binding.bind_cpu_input(name, held[-1])
            else:
                binding.bind_ortvalue_input(name, value)
        for name in host_outputs:
            binding.bind_output(name, "cpu")
        for name in kept_outputs:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        del held
        values = binding.get_outputs()
        count = len(host_outputs)
        return [v.numpy() for v in values[:count]], list(values[count:])


def create_session(
    model: Path | bytes,
    settings: SessionSettings,
    *,
    save_optimized_to: Path | None = None,
    external_data_name: str | None = None,
) -> ModelSession:
    """Build a session; ``device = cuda`` that is not really obtained raises DeviceUnavailable.

    ``save_optimized_to``: also write the graph as optimised at ``settings.graph_optimization``
    there (the exporter folds constants so), its weights in ``external_data_name`` beside it.
    """
    providers = _providers_to_ask(settings)
    requested = [p[0] if isinstance(p, tuple) else p for p in providers]
    source = str(model) if isinstance(model, Path) else f"<{len(model)} bytes>"
    options = session_options(settings, cuda=CUDA in requested)
    if save_optimized_to is not None:
        options.optimized_model_filepath = str(save_optimized_to)
        if external_data_name:
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", external_data_name
            )
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
            )
    try:
        model_arg = str(model) if isinstance(model, Path) else model
        session = ort.InferenceSession(model_arg, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise ModelLoadError(f"onnxruntime cannot load {source}: {exc}") from exc
    obtained = session.get_providers()
    if settings.device == "cuda" and CUDA not in obtained:
        raise DeviceUnavailable(
            f"device = cuda: asked onnxruntime for {requested} but the session got {obtained} "
            "(CUDA libraries missing or incompatible?); set device = auto to fall back to CPU"
        )
    if CUDA in requested and CUDA not in obtained:
        log.warning("asked for %s, obtained %s for %s: running on CPU", requested, obtained, source)
    else:
        log.info("session for %s: providers asked %s, obtained %s", source, requested, obtained)
    signature = Signature(
        inputs=tuple(spec_from_node_arg(a) for a in session.get_inputs()),
        outputs=tuple(spec_from_node_arg(a) for a in session.get_outputs()),
    )
    return ModelSession(session, requested, obtained, signature, source, settings.cuda_device_id)
