"""``export_generation``: a causal LM as a verified generation package (manifest format 2).

Steps, in an order that bounds memory: load the PyTorch model; record its greedy answers to the
verification prompts; export the segments into a dot-named temp folder beside the target; free
the PyTorch model; verify the package's default stages through ``runtime.decoder`` (what nodes
serve); optionally quantise every segment and measure what it costs; write the manifest and
rename the folder into place. A failure at any step leaves nothing behind.
"""

from __future__ import annotations

import gc
import logging
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import onnx

from exporter.decoder_export import estimate_bytes, export_segments, plan_layers, rewrite_segment
from exporter.decoder_quantize import (
    DEFAULT_MAX_PERPLEXITY_RATIO,
    QuantizationFigures,
    check_method,
    quantize_segment,
)
from exporter.decoder_verify import (
    ANSWER_TOKENS,
    PERPLEXITY_FILE,
    Reference,
    agreement,
    load_chain,
    load_prompts,
    perplexity,
    render_prompt,
    text_ids,
    torch_reference,
    verify_chain,
)
from exporter.errors import ExportError, PackageExists, QuantizationRejected
from exporter.export import _size, _Step
from exporter.llm_source import LoadedLM, load_causal_lm
from exporter.package_writer import (
    _check_name,
    _check_stages,
    _default_opset,
    _fsync_dir,
    _graph_inputs,
    _move_into_place,
    _tensor_info,
    _write_file,
)
from exporter.partition import default_grouping
from runtime.manifest import (
    FORMAT_VERSION,
    GenerationInfo,
    Manifest,
    SegmentInfo,
    package_digest,
    write_manifest,
)
from runtime.package import PackageRef
from runtime.session import SessionSettings

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass
class GenerationExportResult:
    folder: Path | None  # None for a dry run
    name: str
    version: int
    source: str
    layers: list[tuple[int, int]]  # (first layer, count) of each segment
    segment_bytes: list[int]  # estimated from the weights for a dry run
    default_stages: list[list[int]]
    verification: dict[str, Any] = field(default_factory=dict)
    generation: GenerationInfo | None = None
    seconds: float = 0.0
    # PyTorch's greedy answers to the committed prompts (in memory only: what tests compare
    # served answers with)
    references: list[Reference] = field(default_factory=list)


def export_generation(
    source: str | Path,
    model_repo: Path,
    name: str,
    *,
    version: int = 1,
    stages: int | None = None,
    layers_per_segment: int | None = None,
    quantize: str | None = None,
    max_perplexity_ratio: float = DEFAULT_MAX_PERPLEXITY_RATIO,
    force: bool = False,
    dry_run: bool = False,
    progress: TextIO | None = None,
) -> GenerationExportResult:
    """Export ``source`` (see exporter/llm_source.py) into ``{model_repo}/{name}/{version}``.

    Raises ExportError subclasses, each saying what was wrong; nothing is written unless the
    chained segments matched PyTorch and (with ``quantize``) the perplexity ratio is within
    ``max_perplexity_ratio`` or ``force`` is given.
    """
    started = time.perf_counter()
    check_method(quantize)
    _check_name(name)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ExportError(f"version must be a non-negative integer, got {version!r}")
    if stages is not None and (isinstance(stages, bool) or stages < 1):
        raise ExportError(f"stages must be 1 or more, got {stages!r}")
    if not max_perplexity_ratio > 0:
        raise ExportError(f"max_perplexity_ratio must be above 0, got {max_perplexity_ratio!r}")
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
            layers_per_segment,
            quantize,
            max_perplexity_ratio,
            force,
            dry_run,
            _Step(progress),
            started,
        )
    except OSError as exc:  # a full disk, a read-only repository
        raise ExportError(f"export of {name} failed: {exc}; no package was written") from exc


def _export(
    source: str | Path,
    repo: Path,
    name: str,
    version: int,
    stages: int | None,
    layers_per_segment: int | None,
    quantize: str | None,
    max_ratio: float,
    force: bool,
    dry_run: bool,
    step: _Step,
    started: float,
) -> GenerationExportResult:
    with step(f"loading {source}"):
        lm = load_causal_lm(source)
    config = lm.config
    plan = plan_layers(int(config.num_hidden_layers), layers_per_segment)
    if stages is not None and stages > len(plan):
        raise ExportError(
            f"stages {stages} is more than the {len(plan)} segment(s); choose 1 to {len(plan)} "
            "or fewer layers per segment"
        )
    layers = [(s.first, s.count) for s in plan]
    if dry_run:
        sizes = estimate_bytes(lm.model, plan)
        grouping = default_grouping(sizes, stages or 1)
        seconds = time.perf_counter() - started
        return GenerationExportResult(
            None, name, version, lm.label, layers, sizes, grouping, seconds=seconds
        )
    refs = []
    prompts = load_prompts()
    for k, messages in enumerate(prompts):
        with step(f"PyTorch greedy answer {k + 1}/{len(prompts)}"):
            refs.append(
                torch_reference(lm.model, render_prompt(lm.tokenizer, messages), ANSWER_TOKENS)
            )
    context = int(config.max_position_embeddings)
    ppl_ids = text_ids(lm.tokenizer, PERPLEXITY_FILE.read_text(encoding="utf-8"), context)
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{version}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        segments = export_segments(
            lm.model, plan, tmp, lambda k, n: step(f"exporting segment {k + 1}/{n}")
        )
        generation = _write_generation_files(tmp, lm)
        pad_id = lm.pad_token_id if lm.pad_token_id is not None else lm.eos_token_ids[0]
        label = lm.label
        lm.model = None  # PyTorch's part is done: free it before the sessions load
        gc.collect()
        grouping = default_grouping([s.bytes for s in segments], stages or 1)
        package = _draft(tmp, name, version, label, segments, grouping, generation)
        settings = SessionSettings(device="cpu")
        with step(f"loading {len(grouping)} span(s) of the fp32 package"):
            chain = load_chain(package, grouping, settings)
        report = verify_chain(chain, refs, pad_id, step)
        with step(f"fp32 perplexity on {len(ppl_ids)} tokens"):
            ppl = perplexity(chain, ppl_ids)
        del chain
        report["spans_verified"] = grouping
        report["exporter"] = "torch.onnx TorchScript, one graph per segment"
        report["precision"] = quantize or "fp32"
        report["perplexity"] = {"tokens": len(ppl_ids), "fp32": round(ppl, 4)}
        if quantize is not None:
            segments = _quantize(tmp, segments, quantize, step)
            grouping = default_grouping([s.bytes for s in segments], stages or 1)
            package = _draft(tmp, name, version, label, segments, grouping, generation)
            with step(f"loading {len(grouping)} span(s) of the {quantize} package"):
                chain = load_chain(package, grouping, settings)
            with step(f"{quantize} perplexity on {len(ppl_ids)} tokens"):
                quant_ppl = perplexity(chain, ppl_ids)
            with step(f"{quantize} top-1 agreement on {len(refs)} prompt(s)"):
                agree = agreement(chain, refs)
            del chain
            figures = QuantizationFigures(
                quantize,
                ppl,
                quant_ppl,
                agree,
                max_ratio,
                len(ppl_ids),
                len(refs) * ANSWER_TOKENS,
                forced=force,
            )
            report["quantization"] = figures.as_dict()
            if figures.ratio > max_ratio and not force:
                raise QuantizationRejected(
                    f"{quantize} raises the perplexity on {PERPLEXITY_FILE.name} from {ppl:.3f} "
                    f"to {quant_ppl:.3f} (ratio {figures.ratio:.3f}), above max_perplexity_ratio "
                    f"{max_ratio:g}; top-1 agreement {agree:.1%}. Nothing was written; pass "
                    "force=True (--force) to write it anyway, or raise the ratio"
                )
        manifest = _manifest(tmp, name, version, label, segments, grouping, generation, report)
        write_manifest(tmp, manifest)
        _fsync_dir(tmp)
        _move_into_place(tmp, repo / name / str(version), force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    folder = repo / name / str(version)
    log.info("wrote generation package %s (%d segments)", folder, len(segments))
    return GenerationExportResult(
        folder,
        name,
        version,
        label,
        layers,
        [s.bytes for s in segments],
        grouping,
        report,
        generation,
        time.perf_counter() - started,
        refs,
    )


def _quantize(
    folder: Path, segments: list[SegmentInfo], method: str, step: _Step
) -> list[SegmentInfo]:
    quantized = []
    with tempfile.TemporaryDirectory(prefix="appliance-quantize-") as scratch:
        for k, segment in enumerate(segments):
            if segment.kv is None:
                raise ExportError(f"segment {k} has no KV layout; it is not a decoder segment")
            with step(f"quantising segment {k + 1}/{len(segments)} to {method}"):
                staged = Path(scratch) / f"segment-{k}.onnx"
                proto = quantize_segment(folder / segment.file, staged, method)
                quantized.append(rewrite_segment(folder, k, proto, segment.kv))
                del proto
    return quantized


def _write_generation_files(folder: Path, lm: LoadedLM) -> GenerationInfo:
    config = lm.config
    tokenizer = lm.tokenizer
    _write_file(folder / TOKENIZER_FILE, tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: the default one serves chat
        template = template.get("default") or next(iter(template.values()), None)
    if template:
        _write_file(folder / CHAT_TEMPLATE_FILE, str(template).encode("utf-8"))
    if lm.generation_config_file is not None:
        _write_file(folder / GENERATION_CONFIG_FILE, lm.generation_config_file.read_bytes())
    return GenerationInfo(
        tokenizer=TOKENIZER_FILE,
        chat_template=CHAT_TEMPLATE_FILE if template else None,
        eos_token_ids=list(lm.eos_token_ids),
        bos_token_id=lm.bos_token_id,
        pad_token_id=lm.pad_token_id,
        context_length=int(config.max_position_embeddings),
        vocab_size=int(config.vocab_size),
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        dtype="FP32",
        generation_config=GENERATION_CONFIG_FILE if lm.generation_config_file else None,
        defaults=dict(lm.defaults),
    )


def _manifest(
    folder: Path,
    name: str,
    version: int,
    label: str,
    segments: list[SegmentInfo],
    grouping: list[list[int]],
    generation: GenerationInfo,
    verification: dict[str, Any],
) -> Manifest:
    first = onnx.load(str(folder / segments[0].file), load_external_data=False)
    last = onnx.load(str(folder / segments[-1].file), load_external_data=False)
    return Manifest(
        name=name,
        version=version,
        digest=package_digest([s.sha256 for s in segments]),
        opset=_default_opset(first),
        source=label,
        inputs=[_tensor_info(v, "input") for v in _graph_inputs(first.graph)],
        outputs=[_tensor_info(v, "output") for v in last.graph.output],
        segments=segments,
        default_stages=_check_stages(grouping, len(segments)),
        verification=verification,
        format=FORMAT_VERSION,
        kind="generation",
        generation=generation,
    )


def _draft(
    folder: Path,
    name: str,
    version: int,
    label: str,
    segments: list[SegmentInfo],
    grouping: list[list[int]],
    generation: GenerationInfo,
) -> PackageRef:
    """The temp folder as a package (its manifest written without figures) for the runtime."""
    manifest = _manifest(folder, name, version, label, segments, grouping, generation, {})
    write_manifest(folder, manifest)
    return PackageRef(name, version, folder, manifest.digest, segments, manifest)


def format_generation_report(result: GenerationExportResult) -> str:
    """A summary for the CLI: segments, bytes, stages, verification and quantisation figures."""
    total = sum(result.segment_bytes)
    what = "planned (dry run)" if result.folder is None else f"written to {result.folder}"
    rows = [f"{result.name} v{result.version} from {result.source}: {what}"]
    rows.append(f"{'segment':>7}  {'layers':>9}  {'bytes':>12}")
    for k, ((first, count), size) in enumerate(
        zip(result.layers, result.segment_bytes, strict=True)
    ):
        span = f"{first}" if count == 1 else f"{first}-{first + count - 1}"
        rows.append(f"{k:>7}  {span:>9}  {_size(size):>12}")
    rows.append(f"{len(result.layers)} segment(s), {_size(total)}")
    stages = ", ".join(
        f"[{a}-{b}] {_size(sum(result.segment_bytes[a : b + 1]))}" for a, b in result.default_stages
    )
    rows.append(f"default stages: {stages}")
    report = result.verification
    if report:
        batch = report["batch2"]
        rows.append(
            f"verified (fp32, {len(report['spans_verified'])} span(s)) against PyTorch: "
            f"{report['prompts']} prompts, {report['steps_checked']} teacher-forced steps, max "
            f"abs diff {report['max_abs_diff']:.3g} (atol {report['atol']:g}), "
            f"{report['near_ties']} near-tie(s) (top-1/top-2 gap < {report['tie_gap']:g})"
        )
        rows.append(
            f"left-padded batch of 2 (prompts of {batch['prompt_tokens']} tokens): "
            f"{batch['steps_checked']} steps, max abs diff {batch['max_abs_diff']:.3g}, "
            f"{'passed' if batch['passed'] else 'FAILED'}"
        )
        ppl = report["perplexity"]
        rows.append(f"fp32 perplexity {ppl['fp32']:.3f} on {ppl['tokens']} tokens")
    quant = report.get("quantization")
    if quant:
        forced = (
            " (FORCED past the limit)"
            if quant["perplexity_ratio"] > quant["max_perplexity_ratio"]
            else ""
        )
        rows.append(
            f"{quant['method']}: perplexity {quant['perplexity']:.3f} vs fp32 "
            f"{quant['perplexity_fp32']:.3f}, ratio {quant['perplexity_ratio']:.3f} (max "
            f"{quant['max_perplexity_ratio']:g}){forced}; top-1 agreement "
            f"{quant['top1_agreement']:.1%} over {quant['agreement_steps']} steps"
        )
    rows.append(f"took {result.seconds:.1f} s")
    return "\n".join(rows)
