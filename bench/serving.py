"""Served throughput and latency of a node versus the in-process onnxruntime limit.

    python -m bench.serving                 # demo model, concurrency 1/8/32, batching on and off
    python -m bench.serving --quick         # demo model, concurrency 32, binary, a few seconds
    python -m bench.serving --model-repo DIR --model minilm --tokens 16
    python -m bench.serving --quick --device cuda   # node and limit on CUDA (onnxruntime-gpu)

The limit is docs/design.md's: ``session.run`` on pre-built batches of 32 rows with the same threads
and session options as the node. The node runs as a subprocess (``appliance node``) and the load
comes from this process over loopback, one sample per request, binary tensor bodies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import run_load, run_wrk
from bench.report import save_report
from runtime.codec import encode_request
from runtime.datatypes import numpy_dtype
from runtime.package import load_span, open_package
from runtime.session import SessionSettings
from runtime.signature import Signature


def sample_inputs(signature: Signature, rows: int, tokens: int, seed: int = 0) -> dict[str, Any]:
    """Realistic inputs: token ids in range, masks of ones, type ids of zeros, floats N(0,1)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in signature.inputs:
        shape = [
            rows if i == 0 and d == -1 else tokens if d == -1 else d
            for i, d in enumerate(spec.shape)
        ]
        dtype = numpy_dtype(spec.datatype)
        if dtype.kind in "iu":
            if "mask" in spec.name:
                feeds[spec.name] = np.ones(shape, dtype)
            elif "type" in spec.name:
                feeds[spec.name] = np.zeros(shape, dtype)
            else:
                feeds[spec.name] = rng.integers(0, 1000, size=shape).astype(dtype)
        else:
            feeds[spec.name] = rng.normal(size=shape).astype(dtype)
    return feeds


def in_process_limit(
    repo: Path, model: str, settings: SessionSettings, tokens: int, batch: int, seconds: float
) -> dict[str, float]:
    """Rows per second of session.run on pre-built batches (the ceiling a server can reach)."""
    runner = load_span(open_package(repo, model), settings)
    feeds = sample_inputs(runner.signature, batch, tokens)
    runner.run(feeds)
    runner.run(feeds)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runner.run(feeds)
        runs += 1
    elapsed = time.perf_counter() - start
    return {
        "batch": batch,
        "rows_per_s": round(runs * batch / elapsed, 1),
        "ms_per_run": round(elapsed / runs * 1000, 3),
    }


class NodeProcess:
    """``appliance node`` as a subprocess on 127.0.0.1, port chosen by the OS."""

    def __init__(self, repo: Path, model: str, extra: list[str]) -> None:
        command = [
            sys.executable,
            "-m",
            "appliance.cli",
            "node",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model-repo",
            str(repo),
            "--models",
            model,
            "--log-level",
            "warning",
            *extra,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"http://[^\s]+", line)
        if not match:
            self.stop()
            raise RuntimeError(f"node did not start: {line!r}")
        self.url = match.group(0)

    async def wait_ready(self, timeout_s: float = 120) -> None:
        import aiohttp

        end = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < end:
                try:
                    async with session.get(self.url + "/v2/health/ready") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.url} not ready after {timeout_s}s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def measure_node(
    repo: Path,
    model: str,
    node_flags: list[str],
    body: bytes,
    headers: dict[str, str],
    sweep: list[int],
    seconds: float,
    client: str,
) -> list[dict[str, Any]]:
    import aiohttp

    node = NodeProcess(repo, model, node_flags)
    try:
        await node.wait_ready()
        url = f"{node.url}/v2/models/{model}/infer"
        rows = []
        auth = {k: v for k, v in headers.items() if k == "Authorization"}
        async with aiohttp.ClientSession(headers=auth) as session:
            for concurrency in sweep:
                before = await _stats(session, node.url, model)
                if client == "wrk":
                    result = await asyncio.to_thread(
                        run_wrk, url, body, headers, concurrency, seconds
                    )
                else:
                    result = await run_load(url, body, headers, concurrency, seconds)
                after = await _stats(session, node.url, model)
                row: dict[str, Any] = result.as_dict()
                runs = after["execution_count"] - before["execution_count"]
                inferred = after["inference_count"] - before["inference_count"]
                row["mean_batch"] = round(inferred / runs, 2) if runs else 0.0
                rows.append(row)
        return rows
    finally:
        node.stop()


async def _stats(session: Any, url: str, model: str) -> dict[str, Any]:
    async with session.get(f"{url}/v2/models/{model}/stats") as response:
        stats: dict[str, Any] = (await response.json())["model_stats"][0]
        return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-repo", type=Path, help="repository (default: the demo's)")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tokens", type=int, default=16, help="sequence length of a sample")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="onnxruntime intra-op threads, for the node and the limit alike",
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="the node's and the limit's"
    )
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per point")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--json-bodies", action="store_true", help="JSON instead of binary")
    parser.add_argument(
        "--client",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="load generator: wrk (C, leaves the cores to the server) or an aiohttp client in "
        "this process; auto = wrk where installed",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one model, concurrency 32, batching on, binary, a few seconds",
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="also measure the node with a bearer token required (and sent), in the same run",
    )
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    args = parser.parse_args(argv)

    if args.model_repo is None:
        from appliance.cli import default_demo_repo
        from exporter.demo_model import ensure_demo_package

        args.model_repo = default_demo_repo()
        ensure_demo_package(args.model_repo)
    sweep = [32] if args.quick else [int(c) for c in args.concurrency.split(",")]
    seconds = 4.0 if args.quick else args.seconds
    settings = SessionSettings(device=args.device, intra_op_threads=args.threads)
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"

    limit = in_process_limit(
        args.model_repo, args.model, settings, args.tokens, 32, 3.0 if args.quick else 6.0
    )
    signature = load_span(open_package(args.model_repo, args.model), settings).signature
    binary = not args.json_bodies
    body, header_length = encode_request(
        sample_inputs(signature, 1, args.tokens), binary_inputs=binary, binary_outputs=binary
    )
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)

    common = ["--intra-op-threads", str(args.threads), "--device", args.device]
    common += ["--max-queue-delay-us", str(args.max_queue_delay_us)]
    modes = {"batching": ["--max-batch-size", str(args.max_batch_size)]}
    if not args.quick:
        modes["max_batch_size=1"] = ["--max-batch-size", "1"]
    mode_headers = {mode: headers for mode in modes}
    if args.auth:
        token = os.urandom(16).hex()
        # an admin token: the bench also reads /v2/models/*/stats, an admin path
        modes["batching, auth on"] = [*modes["batching"], "--tokens", f"admin:{token}"]
        mode_headers["batching, auth on"] = {**headers, "Authorization": f"Bearer {token}"}
    results: dict[str, list[dict[str, Any]]] = {}
    for mode, flags in modes.items():
        results[mode] = asyncio.run(
            measure_node(
                args.model_repo,
                args.model,
                common + flags,
                body,
                mode_headers[mode],
                sweep,
                seconds,
                client,
            )
        )

    report = {
        "bench": "serving",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": args.model,
        "tokens": args.tokens,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "device": args.device,
        "bodies": "binary" if binary else "json",
        "client": client,
        "in_process_limit": limit,
        "served": results,
    }
    print(
        f"\nmodel {args.model}, {args.tokens} tokens, {args.threads} onnxruntime threads, "
        f"{report['bodies']} bodies, one sample per request, load from {client}"
    )
    print(f"in-process limit (session.run, batches of 32): {limit['rows_per_s']:.1f} rows/s")
    print(
        f"{'mode':<20}{'conc':>6}{'req/s':>10}{'x limit':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'batch':>7}{'fail':>6}"
    )
    for mode, rows in results.items():
        for row in rows:
            ratio = row["throughput_rps"] / limit["rows_per_s"]
            row["ratio_to_limit"] = round(ratio, 3)
            print(
                f"{mode:<20}{row['concurrency']:>6}{row['throughput_rps']:>10.1f}{ratio:>9.2f}"
                f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['mean_batch']:>7.1f}"
                f"{row['failures']:>6}"
            )
    save_report(report, args.out, f"serving-{args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
