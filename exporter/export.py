"""``export_model``: convert, cut into segments, verify, write the package (the CLI maps onto it).

Memory is bounded by doing things in sequence: the PyTorch model is freed by ``convert`` before
the ONNX model is loaded whole; the whole model is freed before the segments are checked, and
those are checked one session at a time.
"""

from __future__ import annotations

import gc
import logging
import resource
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import onnx

from exporter.errors import ExportError, PackageExists, ReducedPrecisionRejected, VerificationFailed
from exporter.package_writer import write_package
from exporter.partition import (
    SegmentPlan,
    analyse,
    boundaries,
    build_segment,
    candidates,
    default_grouping,
    plan_segments,
)
from exporter.shapes import (
    fold_constants,
    infer_shapes,
    measure_bytes,
    pin_observed_dims,
    type_by_running,
    untyped,
)
from exporter.verify import Comparison, compare, run_chained, run_whole

log = logging.getLogger(__name__)

DEFAULT_MIN_SEGMENT_BYTES = 4 * 1024 * 1024
QUANTIZE_CHOICES = ("int8",)
# int8 or fp16 outputs against fp32: dynamic int8 moved MiniLM's hidden states by up to 1.14
# (measured), which this refuses unless asked; fp16 keeps within about 1e-3
DEFAULT_REDUCED_ATOL = 0.05


@dataclass
class ExportResult:
    folder: Path | None  # None for a dry run
    plans: list[SegmentPlan]
    default_stages: list[list[int]]
    verification: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Step:
    out: TextIO | None

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        started = time.perf_counter()
        log.info("%s ...", what)
        if self.out is not None:
            print(f"{what} ...", end="", file=self.out, flush=True)
        yield
        took = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        log.info("%s done in %.1fs (peak RSS so far %.0f MiB)", what, took, peak)
        if self.out is not None:
            print(f" {took:.1f}s", file=self.out, flush=True)


def export_model(
    source: str | Path | onnx.ModelProto,
    model_repo: Path,
    name: str,
    *,
    version: int = 1,
    stages: int | None = None,
    min_segment_bytes: int = DEFAULT_MIN_SEGMENT_BYTES,
    opset: int = 17,
    quantize: str | None = None,
    fp16: bool = False,
    task: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    reduced_atol: float = DEFAULT_REDUCED_ATOL,
    slack: float = 0.25,
    source_label: str | None = None,
    progress: TextIO | None = None,
) -> ExportResult:
    """Export ``source`` into ``{model_repo}/{name}/{version}`` as verified segments.

    ``source``: a Hugging Face folder, ``module.path:factory``, an ``.onnx`` file, or an
    ``onnx.ModelProto`` (then ``source_label`` names it in the manifest). Raises ExportError
    subclasses, each saying what was wrong; nothing is written unless everything passed.
    """
    started = time.perf_counter()
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"quantize {quantize!r} is not supported; accepted: int8")
    if quantize and fp16:
        raise ExportError("choose one of --quantize int8 and --fp16, not both")
    if stages is not None and stages < 1:
        raise ExportError(f"stages must be 1 or more, got {stages}")
    if min_segment_bytes < 0:
        raise ExportError(f"min_segment_bytes must be 0 or more, got {min_segment_bytes}")
    target = Path(model_repo) / name / str(version)
    if target.exists() and not force and not dry_run:
        raise PackageExists(f"{target} exists already; pass --force to replace it")
    try:
        return _export(
            source,
            Path(model_repo),
            name,
            version,
            stages,
            min_segment_bytes,
            opset,
            quantize,
            fp16,
            task,
            dry_run,
            force,
            atol,
            rtol,
            reduced_atol,
            slack,
            source_label,
            progress,
            started,
        )
    except OSError as exc:  # a full disk, a read-only repository, a missing file
        raise ExportError(f"export of {name} failed: {exc}; no package was written") from exc


def _export(
    source: str | Path | onnx.ModelProto,
    model_repo: Path,
    name: str,
    version: int,
    stages: int | None,
    min_segment_bytes: int,
    opset: int,
    quantize: str | None,
    fp16: bool,
    task: str | None,
    dry_run: bool,
    force: bool,
    atol: float,
    rtol: float,
    reduced_atol: float,
    slack: float,
    source_label: str | None,
    progress: TextIO | None,
    started: float,
) -> ExportResult:
    step = _Step(progress)
    with tempfile.TemporaryDirectory(prefix="appliance-export-") as tmp:
        work = Path(tmp)
        with step("converting"):
            onnx_path, samples, reference, label = _convert(source, work, task, opset)
            label = source_label or label
        with step("cutting the graph into segments"):
            plans, segment_paths, outputs = _cut(onnx_path, work, samples, min_segment_bytes, slack)
        if stages is not None and stages > len(plans):
            raise ExportError(
                f"--stages {stages} is more than the {len(plans)} segment(s) found; choose 1 to "
                f"{len(plans)} or lower --min-segment-bytes"
            )
        grouping = default_grouping([p.weight_bytes for p in plans], stages or 1)
        if dry_run:
            return ExportResult(None, plans, grouping, {}, time.perf_counter() - started)
        report: dict[str, Any] = {"atol": atol, "rtol": rtol, "samples": len(samples)}
        with step("running the whole model"):
            whole = run_whole(onnx_path, samples)
        if reference is not None:
            versus_torch = compare(reference, whole, atol, rtol)
            report["whole_vs_torch"] = versus_torch.as_dict()
            _raise_if_failed("the whole ONNX model versus PyTorch", versus_torch, atol, rtol)
        with step(f"checking {len(plans)} chained segment(s) against the whole model"):
            chained = compare(whole, run_chained(segment_paths, samples, outputs), atol, rtol)
        report["chained_vs_whole"] = chained.as_dict()
        _raise_if_failed("the chained segments versus the whole model", chained, atol, rtol)
        if quantize or fp16:
            precision = quantize or "fp16"
            with step(f"converting segments to {precision}"):
                segment_paths = _reduce_precision(segment_paths, work, quantize)
            report["precision"] = precision
            try:
                reduced = run_chained(segment_paths, samples, outputs)
            except Exception as exc:  # onnxruntime's errors are untyped
                if not fp16:
                    raise ExportError(f"the {precision} segments do not run: {exc}") from exc
                report["note"] = (
                    "fp16 segments do not run on onnxruntime's CPU provider here "
                    f"({type(exc).__name__}); their accuracy is checked by the gpu-marked test"
                )
            else:
                # lower precision misses the fp32 tolerance by design: it has its own
                versus = compare(whole, reduced, reduced_atol, rtol)
                report["reduced_vs_whole"] = {**versus.as_dict(), "atol": reduced_atol}
                if versus.failed and not force:
                    raise ReducedPrecisionRejected(
                        f"the {precision} segments differ from the fp32 model beyond "
                        f"--reduced-atol {reduced_atol:g}: "
                        + "; ".join(f"{n}: max abs diff {d:.3g}" for n, d in versus.failed.items())
                        + "; raise --reduced-atol, or pass --force to write the package anyway"
                    )
                report["reduced_vs_whole"]["accepted"] = "forced" if versus.failed else "within"
        del whole
        gc.collect()
        with step("writing the package"):
            segments = [onnx.load(str(p)) for p in segment_paths]
            folder = write_package(
                model_repo,
                name,
                version,
                segments,
                source=label,
                default_stages=grouping,
                verification=report,
                force=force,
            )
    return ExportResult(folder, plans, grouping, report, time.perf_counter() - started)


def _convert(
    source: str | Path | onnx.ModelProto, work: Path, task: str | None, opset: int
) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]] | None, str]:
    from exporter.convert import convert, sample_inputs_for
    from exporter.isolated import convert_isolated

    if isinstance(source, onnx.ModelProto):
        path = work / "whole.onnx"
        onnx.save_model(source, str(path))
        return path, sample_inputs_for(source), None, "builtin:model"
    if Path(str(source)).suffix.lower() == ".onnx":
        converted = convert(str(source), work / "convert", task=task, opset=opset)
    else:  # torch sources: their memory goes back to the OS with the child process
        converted = convert_isolated(str(source), work / "isolated", task, opset)
    return converted.onnx_path, converted.samples, converted.reference, converted.source


def _cut(
    onnx_path: Path, work: Path, samples: list[dict[str, Any]], min_bytes: int, slack: float
) -> tuple[list[SegmentPlan], list[Path], list[str]]:
    """Plan the segments and save each as its own file.

    Only the graph is loaded (the folded weights stay in their external file): probes run from
    that file, and each segment loads just the weights it reads, so memory stays near one copy.
    """
    folded = fold_constants(onnx_path, work)
    folder = folded.parent
    model = infer_shapes(onnx.load(str(folded), load_external_data=False))
    facts = analyse(model)
    crossing_anywhere = sorted({n for b in boundaries(facts) for n in b.frontier})
    largest = max(samples, key=lambda s: sum(np.asarray(v).size for v in s.values()))
    facts.tensor_bytes.update(measure_bytes(model, crossing_anywhere, largest, folder))
    cuts = [b.position for b in candidates(boundaries(facts), slack)]
    plans = plan_segments(facts, cuts, min_bytes)
    crossing = sorted({n for p in plans[1:] for n in p.inputs})
    missing = untyped(model, crossing)
    if missing:
        model = type_by_running(model, missing, samples[0], folder)
    # fixed dims where every sample agrees: spans get exact signatures (validation, warm-up)
    model = pin_observed_dims(model, crossing, samples, folder)
    facts = analyse(model)
    plans = plan_segments(facts, cuts, min_bytes)
    paths = []
    segment_dir = work / "segments"
    segment_dir.mkdir()
    for k, plan in enumerate(plans):
        staged = folder / f"staged-{k}.onnx"  # beside the weights its references point into
        onnx.save_model(build_segment(model, facts, plan), str(staged))
        segment = onnx.load(str(staged))  # reads this segment's weights only
        staged.unlink()
        path = segment_dir / f"segment-{k}.onnx"
        big = segment.ByteSize() > 2**31 - 1
        onnx.save_model(segment, str(path), save_as_external_data=big)
        del segment
        onnx.checker.check_model(str(path))
        paths.append(path)
    outputs = list(facts.outputs)
    del model, facts
    gc.collect()
    return plans, paths, outputs


def _reduce_precision(paths: list[Path], work: Path, quantize: str | None) -> list[Path]:
    """int8 (onnxruntime dynamic quantisation) or fp16 (fp32 kept at the segment boundaries)."""
    out_dir = work / ("int8" if quantize else "fp16")
    out_dir.mkdir()
    reduced = []
    for path in paths:
        target = out_dir / path.name
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(path), str(target), weight_type=QuantType.QInt8)
        else:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
            onnx.save_model(model, str(target))
        reduced.append(target)
    return reduced


def _raise_if_failed(what: str, comparison: Comparison, atol: float, rtol: float) -> None:
    if comparison.failed:
        raise VerificationFailed(what, comparison.failed, atol, rtol)


def format_plan(result: ExportResult) -> str:
    """The plan as a table: segment, nodes, weight bytes, frontier tensors, default grouping."""
    rows = [f"{'segment':>7}  {'nodes':>9}  {'weights':>12}  inputs -> outputs"]
    for k, plan in enumerate(result.plans):
        frontier = f"{', '.join(plan.inputs)} -> {', '.join(plan.outputs)}"
        rows.append(
            f"{k:>7}  {plan.start:>4}-{plan.stop - 1:<4}  {_size(plan.weight_bytes):>12}  "
            f"{frontier}"
        )
    total = sum(p.weight_bytes for p in result.plans)
    rows.append(f"{len(result.plans)} segment(s), {_size(total)} of weights")
    stages = ", ".join(
        f"[{a}-{b}] {_size(sum(p.weight_bytes for p in result.plans[a : b + 1]))}"
        for a, b in result.default_stages
    )
    rows.append(f"default grouping: {stages}")
    return "\n".join(rows)


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{count} B"
        value /= 1024
    return f"{count} B"


def parse_size(text: str) -> int:
    """``4MB``, ``1.5GiB``, ``800k``, ``1000`` -> bytes; anything else is an ExportError."""
    units = {
        "": 1,
        "b": 1,
        "k": 1000,
        "kb": 1000,
        "kib": 1024,
        "m": 10**6,
        "mb": 10**6,
        "mib": 2**20,
        "g": 10**9,
        "gb": 10**9,
        "gib": 2**30,
    }
    cleaned = text.strip().lower().replace("_", "")
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number) :].strip()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value < 0 or number.strip() == "":
        raise ExportError(
            f"{text!r} is not a size; give bytes as a number with an optional unit, e.g. 4MiB, "
            "500MB, 1.5GiB, 800k"
        )
    return int(value * units[unit])
