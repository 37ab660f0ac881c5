"""Checking a cut model: the chained segments against the whole model, the whole against PyTorch.

The chain runs through ``runtime.package.SpanRunner``, the code nodes serve spans with, so what
is verified is what is served. Runs go in sequence to bound memory: one segment's session at a
time, freed before the next is loaded.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import ExportError
from exporter.shapes import cpu_settings
from runtime.package import SpanRunner
from runtime.session import create_session

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]


@dataclass
class Comparison:
    """Max abs difference per output over all samples, and which outputs were out of tolerance."""

    max_abs_diff: dict[str, float] = field(default_factory=dict)
    failed: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": {k: float(f"{v:.4g}") for k, v in self.max_abs_diff.items()}}


def run_whole(path: Path, samples: list[Tensors], threads: int = 0) -> list[Tensors]:
    runner = SpanRunner([create_session(path, cpu_settings(threads=threads))])
    wanted = {spec.name for spec in runner.signature.inputs}
    results = [runner.run({k: v for k, v in s.items() if k in wanted}) for s in samples]
    del runner
    gc.collect()
    return results


def run_chained(
    paths: Iterable[Path], samples: list[Tensors], outputs: list[str], threads: int = 0
) -> list[Tensors]:
    """Feed every sample through the segments, loading one segment at a time."""
    envs = [dict(sample) for sample in samples]
    for path in paths:
        runner = SpanRunner([create_session(path, cpu_settings(threads=threads))])
        inputs = [spec.name for spec in runner.signature.inputs]
        for env in envs:
            missing = [n for n in inputs if n not in env]
            if missing:
                raise ExportError(
                    f"{path.name} needs {', '.join(missing)}, which no earlier segment makes"
                )
            env.update(runner.run({n: env[n] for n in inputs}))
        del runner
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
