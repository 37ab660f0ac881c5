"""Two exports of one generation package, side by side: decode step time of the whole model.

    python -m bench.package_ab BEFORE_REPO AFTER_REPO [--name smollm2] [--rows 1,4,16,32]

Each repository holds the package ``--name`` as an exporter wrote it (say, one from the commit
before an exporter change and one from after). Both load as one ``DecoderSpan`` over all their
segments, in this process, with the same onnxruntime threads. For each batch size, ``rows``
sequences of different prompt lengths are prefilled in each, then decode steps of all rows run
as one batch, the two packages alternating step by step so the machine's drift hits both alike.
Prints the median step time of each, their ratio, and how far the two packages' logits are
apart at the same step (the same graph interface must give the same answers); with ``--out``
also JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.decoder import DecoderSpan, SequenceKV
from runtime.decoder_load import load_decoder_span
from runtime.package import open_package
from runtime.session import SessionSettings


def load_whole(repo: Path, name: str, threads: int) -> DecoderSpan:
    package = open_package(repo, name)
    last = len(package.segments) - 1
    return load_decoder_span(package, SessionSettings(device="cpu", intra_op_threads=threads),
                             0, last)  # fmt: skip


def prefilled(span: DecoderSpan, rows: int, seed: int = 0) -> list[SequenceKV]:
    """``rows`` sequences with prompts of 40, 43, 46, ... tokens (the same ids in each span)."""
    rng = np.random.default_rng(seed)
    vocab = span.info.vocab_size
    kvs = []
    for row in range(rows):
        kv = span.empty_kv()
        span.step([kv], rng.integers(min(100, vocab // 2), min(5000, vocab), (1, 40 + 3 * row)))
        kvs.append(kv)
    return kvs


def compare(spans: dict[str, DecoderSpan], rows: int, steps: int) -> dict[str, Any]:
    """Median ms of a ``rows``-row decode step in each span, alternating; logits' distance."""
    kvs = {label: prefilled(span, rows) for label, span in spans.items()}
    first = next(iter(spans.values()))
    tokens = np.full((rows, 1), min(1000, first.info.vocab_size - 1), np.int64)
    times: dict[str, list[float]] = {label: [] for label in spans}
    worst = 0.0
    agree = 0
    for step in range(steps + 2):  # two warm-up steps, not timed
        logits = {}
        order = list(spans.items())
        for label, span in order if step % 2 else order[::-1]:  # who goes first alternates
            started = time.perf_counter()
            logits[label] = span.step(kvs[label], tokens)
            if step >= 2:
                times[label].append(time.perf_counter() - started)
        before, after = logits["before"], logits["after"]
        worst = max(worst, float(np.max(np.abs(before - after))))
        agree += int(np.array_equal(before.argmax(-1), after.argmax(-1)))
        tokens = before.argmax(-1)[:, None].astype(np.int64)  # both follow the same tokens
    medians = {label: statistics.median(t) * 1000 for label, t in times.items()}
    before_ms, after_ms = medians["before"], medians["after"]
    return {
        "rows": rows,
        "median_step_ms": {label: round(ms, 2) for label, ms in medians.items()},
        "tok_s": {label: round(rows * 1000 / ms, 1) for label, ms in medians.items()},
        "after_over_before_speed": round(before_ms / after_ms, 3),
        "max_abs_logit_diff": worst,
        "steps_with_equal_argmax": f"{agree}/{steps + 2}",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--name", default="smollm2")
    parser.add_argument("--rows", default="1,4,16,32")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    spans = {
        "before": load_whole(args.before, args.name, args.threads),
        "after": load_whole(args.after, args.name, args.threads),
    }
    results = []
    header = ("rows", "before ms", "after ms", "speed x", "max |dlogit|")
    print("{:>4} {:>10} {:>9} {:>8} {:>13} argmax".format(*header))
    for rows in [int(r) for r in args.rows.split(",")]:
        print(f"  {rows} rows: {args.steps} steps each ...", flush=True)
        result = compare(spans, rows, args.steps)
        ms = result["median_step_ms"]
        print(f"{rows:>4} {ms['before']:>10.2f} {ms['after']:>9.2f} "
              f"{result['after_over_before_speed']:>8.3f} {result['max_abs_logit_diff']:>13.2e} "
              f"{result['steps_with_equal_argmax']}")  # fmt: skip
        results.append(result)
    report = {"bench": "package_ab", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "before": str(args.before), "after": str(args.after), "name": args.name,
              "threads": args.threads, "steps": args.steps, "results": results}  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
