"""What the coordinator's codec work costs per request: the bound on a binary pass-through.

    python -m bench.codec_cost                      # the hot-path MLP's one-row request
    python -m bench.codec_cost --rows 32 --rounds 7

A coordinator that forwarded a client's binary body to the node unchanged (and the node's
answer back) would skip four pieces of work it does per request today: decode and check the
request, encode the hop's body, decode the node's answer, encode the client's reply. It would
still parse the request's JSON header (to check names, shapes and sizes against the model) and
rewrite the reply's header (model name, version, id). This prints the CPU time of each piece
and of the header-only work, the same tensors (the MLP's input and output widths) in every
piece, alternating rounds; the difference is the most a pass-through could save per request,
to set against the coordinator's whole CPU per request (``bench.hotpath``, ``bench.profile``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.mlp import IN_FEATURES, OUT_FEATURES
from bench.report import save_report
from runtime.codec import decode_checked_request, decode_response, encode_request, encode_response
from runtime.signature import DYNAMIC, Signature, TensorSpec

SIGNATURE = Signature(
    (TensorSpec("input", "FP32", (DYNAMIC, IN_FEATURES)),),
    (TensorSpec("output", "FP32", (DYNAMIC, OUT_FEATURES)),),
)


def pieces(rows: int) -> dict[str, Callable[[], Any]]:
    """The coordinator's codec work on one request of ``rows`` rows, piece by piece."""
    rng = np.random.default_rng(0)
    body, length = encode_request({"input": rng.standard_normal((rows, IN_FEATURES), np.float32)})
    output = rng.standard_normal((rows, OUT_FEATURES), np.float32)
    answer, answer_length = encode_response("mlp", "1", None, [("output", output)], [True], None)
    decoded = decode_checked_request(body, length, SIGNATURE, 1 << 24)
    header = bytes(body[:length]) if length is not None else body
    return {
        "decode and check the request": lambda: decode_checked_request(
            body, length, SIGNATURE, 1 << 24
        ),
        "encode the hop's body": lambda: encode_request(decoded.inputs),
        "decode the node's answer": lambda: decode_response(answer, answer_length),
        "encode the reply": lambda: encode_response(
            "mlp", "1", decoded.id, [("output", output)], [True], None
        ),
        "pass-through keeps: parse and rewrite a header": lambda: orjson.dumps(
            orjson.loads(header)
        ),
    }


def cpu_us(work: Callable[[], Any], iterations: int) -> float:
    """CPU microseconds per call (process time: what competes with onnxruntime)."""
    started = time.process_time()
    for _ in range(iterations):
        work()
    return (time.process_time() - started) / iterations * 1e6


def measure(rows: int, rounds: int, iterations: int) -> dict[str, Any]:
    work = pieces(rows)
    for f in work.values():  # warm: first calls pay imports and caches
        cpu_us(f, max(1, iterations // 10))
    per_round: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(rounds):  # alternate: noise hits every piece alike
        for name, f in work.items():
            per_round[name].append(cpu_us(f, iterations))
    medians = {name: statistics.median(v) for name, v in per_round.items()}
    kept = "pass-through keeps: parse and rewrite a header"
    today = sum(v for name, v in medians.items() if name != kept)
    return {
        "bench": "codec_cost",
        "rows": rows,
        "rounds": rounds,
        "iterations": iterations,
        "per_round_us": per_round,
        "median_us": medians,
        "codec_today_us": today,
        "pass_through_saves_at_most_us": today - medians[kept],
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"codec CPU per request, {report['rows']} row(s), median of {report['rounds']} rounds:")
    for name, value in report["median_us"].items():
        print(f"  {name:<50} {value:8.1f} us")
    print(f"  {'today, the four pieces':<50} {report['codec_today_us']:8.1f} us")
    print(f"  {'a pass-through saves at most':<50} "
          f"{report['pass_through_saves_at_most_us']:8.1f} us")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20000, help="calls per piece a round")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.rounds < 1 or args.iterations < 1:
        parser.error("--rows, --rounds and --iterations must be at least 1")
    report = measure(args.rows, args.rounds, args.iterations)
    print_report(report)
    save_report(report, args.out, "codec-cost")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
