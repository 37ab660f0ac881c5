"""Checking a cut model: the chained segments against the whole model, the whole against PyTorch.

Runs go in sequence to bound memory: one session at a time, freed before the next is loaded.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from exporter.errors import ExportError

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]


class VerificationFailed(ExportError):
    """Some outputs differ beyond tolerance; the message lists each with its max difference."""

    def __init__(self, what: str, failures: dict[str, float], atol: float, rtol: float) -> None:
        listing = "; ".join(f"{name}: max abs diff {diff:.3g}" for name, diff in failures.items())
        super().__init__(
            f"{what}: {len(failures)} output(s) differ beyond atol={atol:g}, rtol={rtol:g}: "
            f"{listing}"
        )
        self.failures = failures


@dataclass
class Comparison:
    """Max abs difference per output over all samples, and which outputs were out of tolerance."""

    max_abs_diff: dict[str, float] = field(default_factory=dict)
    failed: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": {k: float(f"{v:.4g}") for k, v in self.max_abs_diff.items()}}


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_whole(path: Path, samples: list[Tensors], threads: int = 0) -> list[Tensors]:
    session = _session(path, threads)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    results = [
        dict(
            zip(names, session.run(names, {k: v for k, v in s.items() if k in wanted}), strict=True)
        )
        for s in samples
    ]
    del session
    gc.collect()
    return results


def run_chained(
    paths: Iterable[Path], samples: list[Tensors], outputs: list[str], threads: int = 0
) -> list[Tensors]:
    """Feed every sample through the segments, loading one segment at a time."""
    envs = [dict(sample) for sample in samples]
    for path in paths:
        session = _session(path, threads)
        inputs = [i.name for i in session.get_inputs()]
        names = [o.name for o in session.get_outputs()]
        for env in envs:
            missing = [n for n in inputs if n not in env]
            if missing:
                raise ExportError(
                    f"{path.name} needs {', '.join(missing)}, which no earlier segment makes"
                )
            env.update(zip(names, session.run(names, {n: env[n] for n in inputs}), strict=True))
        del session
        gc.collect()
    return [{name: env[name] for name in outputs} for env in envs]


def compare(expected: list[Tensors], got: list[Tensors], atol: float, rtol: float) -> Comparison:
    """Elementwise |got - want| <= atol + rtol * |want| (numpy.isclose) over every sample."""
    result = Comparison()
    for want, have in zip(expected, got, strict=True):
        for name, reference in want.items():
            if name not in have:
                continue
            a = np.asarray(have[name])
            b = np.asarray(reference)
            if a.shape != b.shape:
                result.failed[name] = float("inf")
                result.max_abs_diff[name] = float("inf")
                continue
            if a.dtype.kind in "fc" or b.dtype.kind in "fc":
                a64, b64 = a.astype(np.float64), b.astype(np.float64)
                diff = float(np.max(np.abs(a64 - b64))) if a.size else 0.0
                ok = bool(np.all(np.isclose(a64, b64, rtol=rtol, atol=atol, equal_nan=True)))
            else:
                diff = 0.0 if np.array_equal(a, b) else float("inf")
                ok = diff == 0.0
            result.max_abs_diff[name] = max(result.max_abs_diff.get(name, 0.0), diff)
            if not ok:
                result.failed[name] = result.max_abs_diff[name]
    return result
