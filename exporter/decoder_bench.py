"""Measure a generation package: the cost of chaining sessions, and greedy decode speed.

    python -m exporter.decoder_bench REPO NAME [--stages 3] [--threads 2]

Chaining: one decode step (T=1) of layers 1..10 as 10 single-layer sessions versus the same
segments merged into one session (what ``load_decoder_span`` does), runs interleaved so drift in
the machine's load hits both alike; medians. Decode: tokens/s of greedy steps after a prefill,
through one span over all segments and through the package's default stages chained.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporter.decoder_verify import DecoderChain
from runtime.decoder import DecoderSpan, SequenceKV
from runtime.decoder_load import load_decoder_span
from runtime.package import PackageRef, open_package
from runtime.session import SessionSettings


def chaining_overhead(
    package: PackageRef,
    settings: SessionSettings,
    first: int = 1,
    count: int = 10,
    past: int = 40,
    runs: int = 400,
) -> dict[str, float]:
    """Median ms of one decode step through ``count`` chained sessions versus one merged."""
    last = first + count - 1
    chained = load_decoder_span(package, settings, first, last, merge=False)
    merged = load_decoder_span(package, settings, first, last, merge=True)
    hidden = np.random.default_rng(0).normal(size=(1, past, chained.info.hidden_size))
    step_input = hidden[:, :1].astype(np.float32)
    held = {}
    for name, span in (("chained", chained), ("merged", merged)):
        kv = span.empty_kv()
        span.step([kv], hidden.astype(np.float32))
        held[name] = kv
    times: dict[str, list[float]] = {"chained": [], "merged": []}
    for _ in range(runs):
        for name, span in (("chained", chained), ("merged", merged)):
            kv = held[name]
            fresh = SequenceKV(list(kv.keys), list(kv.values), kv.length)  # same past each run
            started = time.perf_counter()
            span.step([fresh], step_input)
            times[name].append(time.perf_counter() - started)
    chained_ms = statistics.median(times["chained"]) * 1000
    merged_ms = statistics.median(times["merged"]) * 1000
    return {
        "sessions": count,
        "chained_ms": round(chained_ms, 3),
        "merged_ms": round(merged_ms, 3),
        "overhead_pct": round(100 * (chained_ms / merged_ms - 1), 1),
    }


def decode_speed(
    spans: list[DecoderSpan], prompt: list[int], new_tokens: int = 64
) -> dict[str, float]:
    """Greedy: ms to the first token (prefill) and decode tokens/s after it."""
    chain = DecoderChain(spans)
    kvs = chain.new_sequences(1)
    started = time.perf_counter()
    logits = chain.step(kvs, np.array([prompt], np.int64))
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(new_tokens):
        logits = chain.step(kvs, np.array([[int(np.argmax(logits[0]))]], np.int64))
    decode = time.perf_counter() - started
    return {
        "first_token_ms": round(first * 1000, 1),
        "tokens_per_s": round(new_tokens / decode, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("repo", type=Path)
    parser.add_argument("name")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--skip-chaining", action="store_true")
    args = parser.parse_args(argv)
    package = open_package(args.repo, args.name)
    manifest = package.manifest
    if manifest is None or not manifest.is_generation:
        raise SystemExit(f"{args.repo}/{args.name} is not a generation package")
    settings = SessionSettings(device="cpu", intra_op_threads=args.threads)
    report: dict[str, Any] = {}
    if not args.skip_chaining and len(package.segments) >= 11:
        report["chaining"] = chaining_overhead(package, settings)
    prompt = list(range(100, 130))  # 30 tokens, as the one-graph figure was taken
    last = len(package.segments) - 1
    for label, stages in (("1 span", [[0, last]]), ("default stages", manifest.default_stages)):
        spans = [load_decoder_span(package, settings, a, b) for a, b in stages]
        decode_speed(spans, prompt, 8)  # warm-up
        report[f"{label} {stages}"] = decode_speed(spans, prompt)
        del spans
    for key, value in report.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
