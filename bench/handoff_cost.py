"""What a node's run thread and batcher cost a lone request: the bound on skipping them.

    python -m bench.handoff_cost                     # a tiny MLP and the hot-path MLP
    python -m bench.handoff_cost --models tiny --rounds 9

A node hands every batch to a run thread (``run_in_executor``), so that its event loop keeps
reading sockets while onnxruntime computes, and a request reaches that thread through the
dynamic batcher (a queue, the batcher's worker task, a task per run). For one request alone
both could be skipped: run on the loop's own thread. This times one-row requests made one
after another, three ways on the same session, alternating rounds:

- ``inline``: ``runner.run`` called on the event loop's thread (nothing else could run then);
- ``executor``: ``await loop.run_in_executor`` on a one-thread pool, as the batcher does;
- ``batcher``: ``await DynamicBatcher.infer`` with the node's default batch settings.

``executor - inline`` is what the thread hand-off costs a lone request, ``batcher - inline``
what both cost; set them against a node's added latency at concurrency 1 (``bench.hotpath``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.mlp import write_mlp_repo
from bench.report import save_report
from bench.serving import sample_inputs
from runtime.batcher import BatchSettings, DynamicBatcher
from runtime.package import SpanRunner, load_span, open_package
from runtime.session import SessionSettings

SIDES = ("inline", "executor", "batcher")
MODELS: dict[str, dict[str, int]] = {
    "tiny": {"in_features": 64, "width": 64, "hidden_layers": 1, "out_features": 64},
    "mlp": {},  # the hot path's: 256 -> 3072, six 3072 -> 3072, 3072 -> 256
}


def load_runner(work: Path, model: str, threads: int) -> SpanRunner:
    write_mlp_repo(work, model, **MODELS[model])
    return load_span(open_package(work, model), SessionSettings("cpu", intra_op_threads=threads))


async def time_side(call: Callable[[], Awaitable[Any]], requests: int) -> tuple[list[float], float]:
    """Per-request wall times (us) of ``requests`` calls one after another, and CPU us per call
    (this process: the loop's thread and the run thread)."""
    times: list[float] = []
    cpu = time.process_time()
    for _ in range(requests):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1e6)
    return times, (time.process_time() - cpu) / requests * 1e6


async def measure(runner: SpanRunner, rounds: int, requests: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    feeds = sample_inputs(runner.signature, 1, 16)  # one row, N(0, 1)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run")
    batcher = DynamicBatcher(runner.run, BatchSettings(), batchable=runner.signature.batchable)

    async def inline() -> Any:
        return runner.run(feeds)

    async def handed() -> Any:
        return await loop.run_in_executor(executor, runner.run, feeds)

    async def batched() -> Any:
        return await batcher.infer(feeds)

    calls = {"inline": inline, "executor": handed, "batcher": batched}
    outputs = {side: await call() for side, call in calls.items()}  # warm, and the same answer
    for side in SIDES[1:]:
        for name, array in outputs["inline"].items():
            np.testing.assert_array_equal(outputs[side][name], array)
    p50: dict[str, list[float]] = {side: [] for side in SIDES}
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    try:
        for index in range(rounds):
            order = SIDES[index % 3 :] + SIDES[: index % 3]  # rotated, so drift hits all alike
            for side in order:
                times, cpu_us = await time_side(calls[side], requests)
                p50[side].append(statistics.median(times))
                cpu[side].append(cpu_us)
    finally:
        await batcher.close()
        executor.shutdown(wait=True)
    diffs = {
        f"{side} - inline": statistics.median(
            a - b for a, b in zip(p50[side], p50["inline"], strict=True)
        )
        for side in SIDES[1:]
    }
    return {
        "p50_us": {side: round(statistics.median(v), 1) for side, v in p50.items()},
        "cpu_us_per_request": {side: round(statistics.median(v), 1) for side, v in cpu.items()},
        "p50_us_per_round": p50,
        "added_p50_us": {k: round(v, 1) for k, v in diffs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny,mlp", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=0, help="per side a round (0: by model)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads,
                              "rounds": args.rounds, "models": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-handoff-") as tmp:
        for model in args.models.split(","):
            runner = load_runner(Path(tmp), model, args.threads)
            requests = args.requests or (2000 if model == "tiny" else 200)
            print(f"{model}: {args.rounds} rounds x {requests} requests a side", flush=True)
            result = asyncio.run(measure(runner, args.rounds, requests))
            result["requests"] = requests
            report["models"][model] = result
            for side in SIDES:
                print(f"  {side:<9} p50 {result['p50_us'][side]:>9.1f} us   CPU "
                      f"{result['cpu_us_per_request'][side]:>9.1f} us/request")  # fmt: skip
            for name, value in result["added_p50_us"].items():
                print(f"  {name}: {value:+.1f} us p50 (median of per-round differences)")
    save_report(report, args.out, "handoff-cost")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
