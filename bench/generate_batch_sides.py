"""bench/generate_batch.py's peer sides, each N streams decoded as one batch per step, and its
report: medians and ratios, and the table the bench prints.

  (O) the independent limit: optimum's one-graph export in plain onnxruntime, KV preallocated and
      IO-bound, the N prompts left-padded into one prefill (bench/generate_limit.py);
  (P) PyTorch ``generate`` on the same fp32 weights, the N prompts left-padded into one batch
      (bench/generate_inproc.py);
  (C) llama.cpp on the very GGUF file the package came from (Q4_1 weights), N sequences of one
      context through llama-cpp-python's low-level API (bench/llama_driver.py); its ``Llama``
      runs one sequence at a time, so this is what a user of llama.cpp's own batching gets.

Each ``run(texts, ids, new)`` gives the figures of ``figures`` in bench/generate_batch.py; every
side decodes the same ids (the package's tokenizer) greedily for exactly ``new`` tokens.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Figures = Callable[[list[float], list[list[float]]], dict[str, float]]

LABELS = {
    "limit-inproc-batched": ("L", "appliance DecoderSpan in process (batched limit)", "fp32"),
    "limit-inproc-batched-before": (
        "L0",
        "the same, decode batches not kept between steps (before)",
        "fp32",
    ),
    "limit-optimum-batched": ("O", "optimum graph + onnxruntime, left-padded batch", "fp32"),
    "pytorch-batched": ("P", "PyTorch generate, left-padded batch", "fp32"),
    "llama.cpp-batched": ("C", "llama.cpp low-level batch (llama-cpp-python)", "Q4_1"),
    "serve-1span": ("S1", "appliance serve, 1 node (1 span)", "fp32"),
    "serve-1span-1by1": ("S1-1by1", "the same, a call per sequence and step (before)", "fp32"),
    "serve-1span-no-ahead": ("S1-no-ahead", "the same, no decode ahead (before)", "fp32"),
    "serve-1span-one-process": ("S1-1p", "the same, the node in the coordinator's process", "fp32"),
    "serve-3span": ("S3", "appliance serve, 3 nodes (3 spans)", "fp32"),
    "serve-3span-one-process": (
        "S3-1p",
        "the same, the first node in the coordinator's process",
        "fp32",
    ),
    "serve-3span-1cohort": ("S3-1c", "the same, one decode batch a step (before)", "fp32"),
    "serve-3span-2threads": ("S3-t2", "the same, 2 onnxruntime threads a node", "fp32"),
    "serve-3span-no-alone": ("S3-no-alone", "the same, no alone sessions (before)", "fp32"),
    "serve-1span-int4": ("S1-int4", "appliance serve, 1 node (1 span)", "int4"),
    "limit-inproc-batched-int4": (
        "L-int4",
        "appliance DecoderSpan in process (batched limit)",
        "int4",
    ),  # fmt: skip
}


class OptimumLimit:
    """(O): ``BatchLimitRunner`` over the optimum graph, sized for the largest batch."""

    def __init__(self, work: Path, threads: int, capacity: int, streams: int, figures: Figures,
                 say: Any) -> None:  # fmt: skip
        from bench.generate_limit import BatchLimitRunner, check_variant, ensure_limit_graph

        graph = ensure_limit_graph(work, say)
        self.runner = BatchLimitRunner(graph, threads, capacity, streams)
        self.figures = figures
        self.settings = {
            "graph": str(graph),
            "variant_max_abs_diff_vs_optimum_graph": check_variant(graph, threads),
            "onnxruntime_threads": threads,
            "prefill": "the N prompts left-padded into one batch",
        }

    def run(self, texts: list[str], ids: list[list[int]], new: int) -> dict[str, float]:
        started, times, _ = self.runner.generate_batch(ids, new)
        return self.figures([started] * len(ids), times)


class TorchBatch:
    """(P): ``TorchRunner.generate_batch`` with the machine's cores as torch threads."""

    def __init__(self, work: Path, figures: Figures, say: Any) -> None:
        from bench.generate_inproc import TorchRunner
        from bench.generate_limit import ensure_hf_folder

        say("loading the fp32 weights into PyTorch")
        self.runner = TorchRunner(ensure_hf_folder(work, say), os.cpu_count() or 1)
        self.figures = figures
        self.settings = {"torch_threads": self.runner.threads, "padding": "left, pad = EOS"}

    def run(self, texts: list[str], ids: list[list[int]], new: int) -> dict[str, float]:
        started, times, _ = self.runner.generate_batch(ids, new)
        return self.figures([started] * len(ids), times)


class LlamaBatch:
    """(C): the llama driver's batched round; raises ``LlamaBenchError`` where the venv is not
    built (bench/llama_cpp.py --build makes it)."""

    def __init__(self, threads: int, figures: Figures) -> None:
        from bench import llama_cpp
        from bench.generate_common import smollm2_gguf

        if not llama_cpp.llama_built():
            raise llama_cpp.LlamaBenchError(
                f"{llama_cpp.LLAMA_VENV} is not built: python -m bench.llama_cpp --build"
            )
        self.driver = llama_cpp.LlamaDriver(llama_cpp.llama_python(), smollm2_gguf(), threads,
                                            1024)  # fmt: skip
        self.figures = figures
        self.settings: dict[str, Any] = {
            **{k: v for k, v in self.driver.settings.items() if k != "kind"},
            "note": llama_cpp.BATCHED,
        }

    def run(self, texts: list[str], ids: list[list[int]], new: int) -> dict[str, float]:
        out = self.driver.run_batch(ids, new)
        self.settings[f"context_{len(ids)}_streams"] = out["context"]
        return self.figures([0.0] * len(ids), out["times"])

    def close(self) -> None:
        self.driver.close()


PAIRS = [
    ("serve-1span", "serve-1span-no-ahead"),
    ("serve-1span", "serve-1span-1by1"),
    ("serve-1span-one-process", "serve-1span"),
    ("serve-3span-one-process", "serve-3span"),
]


def paired(
    results: dict[str, dict[int, list[dict[str, float]]]], after: str, before: str
) -> dict[str, float]:
    """Per stream count, the median over rounds of after's aggregate over before's."""
    out = {}
    for n, rows in results[after].items():
        others = results[before].get(n, [])
        ratios = [a["aggregate_tok_s"] / b["aggregate_tok_s"]
                  for a, b in zip(rows, others, strict=False) if b["aggregate_tok_s"]]  # fmt: skip
        if ratios:
            out[str(n)] = round(statistics.median(ratios), 2)
    return out


def summarise(
    results: dict[str, dict[int, list[dict[str, float]]]],
    new_tokens: int,
    rounds: int,
    threads: int,
    prefix: dict[str, Any],
) -> dict[str, Any]:
    """Medians per (side, streams), ratios to the two limits, scaling, llama.cpp's best."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_n in results.items():
        if by_n:
            table[name] = {
                str(n): {k: round(statistics.median(r[k] for r in rs), 1) for k in rs[0]}
                for n, rs in by_n.items()
            }

    def over(limit: str) -> dict[str, dict[str, float]]:
        base = table.get(limit, {})
        return {
            name: {n: round(row["aggregate_tok_s"] / base[n]["aggregate_tok_s"], 2)
                   for n, row in rows.items() if n in base and base[n]["aggregate_tok_s"]}
            for name, rows in table.items() if name != limit
        }  # fmt: skip

    llama = table.get("llama.cpp-batched", {})
    best = max((row["aggregate_tok_s"] for row in llama.values()), default=None)
    return {
        "bench": "generate-batch",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": "SmolLM2-135M (fp32 and int4 packages; llama.cpp: the GGUF's Q4_1)",
        "new_tokens": new_tokens,
        "rounds": rounds,
        "threads": threads,
        "medians": table,
        "ratio_to_limit": over("limit-inproc-batched"),
        "ratio_to_optimum_limit": over("limit-optimum-batched"),
        # the int4 server against the int4 limit (the ratios above are against fp32's)
        "int4_ratio_to_int4_limit": over("limit-inproc-batched-int4").get("serve-1span-int4"),
        "scaling_vs_1_stream": {
            name: {
                n: round(row["aggregate_tok_s"] / rows["1"]["aggregate_tok_s"], 2)
                for n, row in rows.items()
            }
            for name, rows in table.items()
            if "1" in rows
        },  # fmt: skip
        "llama_cpp_best_aggregate_tok_s": best,
        "at_16_streams_over_llama_cpp_best": {
            name: round(rows["16"]["aggregate_tok_s"] / best, 2)
            for name, rows in table.items()
            if best and "16" in rows and name != "llama.cpp-batched"
        },
        "prefix_reuse": prefix,
        # a design against the one before it, the median of each round's ratio
        "paired_per_round": {
            f"{after} / {before}": paired(results, after, before)
            for after, before in PAIRS
            if results.get(after) and results.get(before)
        },
        "per_round": results,
    }


def table(report: dict[str, Any]) -> str:
    """One line per (side, streams): aggregate tok/s, x the two limits, ITL, TTFT."""
    medians, sides = report["medians"], report["sides"]
    limits = [medians.get("limit-inproc-batched", {}), medians.get("limit-optimum-batched", {})]
    lines = [
        "",
        f"SmolLM2-135M, {report['new_tokens']} new tokens a stream, greedy, median of "
        f"{report['rounds']} rotated round(s), {report['threads']} cores; load "
        f"{report['loadavg_before']} before, {report['loadavg_after']} after",
        f"{'side':<58}{'prec':>6}{'streams':>8}{'tok/s':>8}{'x L':>7}{'x O':>7}"
        f"{'ITL p50':>9}{'p99':>8}{'TTFT p50':>10}",
    ]
    for name, rows in medians.items():
        key, label, precision = LABELS.get(name, ("?", name, "?"))
        for n, row in rows.items():
            ratios = [
                f"{row['aggregate_tok_s'] / lim[n]['aggregate_tok_s']:.2f}"
                if n in lim and lim[n]["aggregate_tok_s"]
                else "-"
                for lim in limits
            ]
            lines.append(
                f"{'(' + key + ') ' + label:<58}{precision:>6}{n:>8}{row['aggregate_tok_s']:>8.1f}"
                f"{ratios[0]:>7}{ratios[1]:>7}{row['itl_p50_ms']:>9.1f}{row['itl_p99_ms']:>8.1f}"
                f"{row['ttft_p50_ms']:>10.1f}"
            )
    for name, side in sides.items():
        if side.get("skipped"):
            lines.append(f"skipped {name}: {side['skipped'][:200]}")
    best = report.get("llama_cpp_best_aggregate_tok_s")
    if best:
        lines.append(f"llama.cpp's best aggregate: {best} tok/s (Q4_1 weights)")
        for name, ratio in report.get("at_16_streams_over_llama_cpp_best", {}).items():
            lines.append(f"  {name} at 16 streams / llama.cpp's best: {ratio}x")
    lines.append("ITL and TTFT in ms; x L, x O: aggregate over the two batched limits")
    return "\n".join(lines)
