"""The ring's figures in one run (loopback, bounded):

1. added latency per extra span: (p50 with K identity spans on K nodes - p50 with 1 span on 1
   node) / (K - 1), concurrency 1, a [1, 16, 384] fp32 tensor, through the coordinator;
2. the demo model's throughput on a ring of 2 nodes x 2 spans versus 1 node holding it whole
   (both behind the coordinator, concurrency 32, binary bodies; on 2 cores each node of the
   ring gets 1 onnxruntime thread, the single node 2);
3. failed requests while a node is killed (-9) under load: 4 nodes, 2 spans x 2 replicas,
   1,000 requests at concurrency 16.

    python -m bench.ring [--spans 4] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.harness import Ring, http
from bench.loadgen import run_load
from bench.report import save_report
from exporter.demo_model import build_demo_model
from exporter.export import export_model
from exporter.package_writer import write_package
from runtime.codec import encode_request

HIDDEN = 384


def identity_segment(k: int, last: bool) -> onnx.ModelProto:
    """h{k} -> h{k+1} = h{k} + 0: a span that costs (almost) nothing but its hop."""
    zero = numpy_helper.from_array(np.zeros((HIDDEN,), np.float32), f"zero{k}")
    out = "y" if last else f"h{k + 1}"
    graph = helper.make_graph(
        [helper.make_node("Add", [f"h{k}", f"zero{k}"], [out])],
        f"identity{k}",
        [helper.make_tensor_value_info(f"h{k}", TensorProto.FLOAT, ["batch", 16, HIDDEN])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", 16, HIDDEN])],
        [zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def latency_p50(url: str, model: str, body: bytes, length: int | None, count: int) -> float:
    headers = {
        "Inference-Header-Content-Length": str(length),
        "Cache-Control": "no-cache, no-store",
    }
    result = asyncio.run(
        run_load(
            f"{url}/v2/models/{model}/infer",
            body,
            headers,
            1,
            1e9,
            warmup_s=0.5,
            max_requests=count,
        )
    )
    return result.percentile(50)


def bench_hop(
    work: Path, spans: int, count: int, flags: tuple[str, ...] = (), signed: bool = True
) -> dict[str, Any]:
    """``flags`` go to the coordinator and every node (e.g. ``--no-lean-hops``); ``signed``:
    internal calls carry HMAC signatures (the harness's default)."""
    repo = work / "identity-repo"
    if not repo.exists():
        write_package(
            repo,
            "identity",
            1,
            [identity_segment(k, k == spans - 1) for k in range(spans)],
            source="bench:identity",
            default_stages=[[k, k] for k in range(spans)],
        )
    x = np.random.default_rng(0).normal(size=(1, 16, HIDDEN)).astype(np.float32)
    body, length = encode_request({"h0": x})
    p50 = {}
    for k in (1, spans):
        label = "-".join(flags) or "default"
        ring = Ring(work / f"hop-{k}-{label}-{signed}", repo, signed=signed)
        ring.start_coordinator(*flags)
        try:
            for i in range(k):
                ring.start_node(f"n{i}", *flags)
            ring.wait_members(k)
            ring.load("identity", stages=k, replicas=1)
            ring.wait_ready()
            p50[k] = latency_p50(ring.url, "identity", body, length, count)
        finally:
            ring.stop()
    per_span = (p50[spans] - p50[1]) / (spans - 1)
    return {
        "spans": spans,
        "p50_ms_1_span": round(p50[1], 3),
        f"p50_ms_{spans}_spans": round(p50[spans], 3),
        "per_extra_span_ms": round(per_span, 3),
    }


def bench_throughput(work: Path, repo: Path, seconds: float) -> dict[str, Any]:
    ids = np.random.default_rng(0).integers(0, 8192, size=(1, 16)).astype(np.int64)
    body, length = encode_request({"input_ids": ids})
    headers = {
        "Inference-Header-Content-Length": str(length),
        "Cache-Control": "no-cache, no-store",
    }
    out = {}
    cores = os.cpu_count() or 1
    for label, nodes, stages, threads in (
        ("one node, whole model", 1, 1, cores),
        ("ring, 2 nodes x 2 spans", 2, 2, max(1, cores // 2)),
    ):
        ring = Ring(work / f"tp-{nodes}", repo)
        ring.start_coordinator()
        try:
            for i in range(nodes):
                ring.start_node(f"n{i}", threads=threads)
            ring.wait_members(nodes)
            ring.load("demo", stages=stages, replicas=1)
            ring.wait_ready()
            result = asyncio.run(
                run_load(f"{ring.url}/v2/models/demo/infer", body, headers, 32, seconds)
            )
            out[label] = result.as_dict()
        finally:
            ring.stop()
    return out


def bench_kill(work: Path, repo: Path, count: int = 1000, concurrency: int = 16) -> dict[str, Any]:
    ring = Ring(work / "kill", repo)
    ring.start_coordinator()
    try:
        for i in range(4):
            ring.start_node(f"n{i}")
        ring.wait_members(4)
        ring.load("demo", stages=2, replicas=2)
        ring.wait_ready()
        victim = http("GET", ring.url + "/v2/cluster")[1]["placements"]["demo"]["spans"][0][
            "replicas"
        ][0]
        ids = np.arange(16, dtype=np.int64).reshape(1, 16)
        failures: list[str] = []
        done = 0
        lock = threading.Lock()
        reached = threading.Event()

        def one(_: int) -> None:
            nonlocal done
            try:
                ring.infer("demo", ids)
            except Exception as exc:  # counted
                with lock:
                    failures.append(repr(exc))
            with lock:
                done += 1
                if done >= count // 5:
                    reached.set()

        killer = threading.Thread(
            target=lambda: (reached.wait(120), ring.kill(victim, signal.SIGKILL))
        )
        killer.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(count)))
        killer.join()
        return {
            "requests": count,
            "concurrency": concurrency,
            "killed": victim,
            "failed": len(failures),
            "seconds": round(time.perf_counter() - started, 2),
            "first_failures": failures[:3],
        }
    finally:
        ring.stop()


def bench_unload(work: Path, repo: Path) -> dict[str, Any]:
    """RSS of a node holding the whole demo model, then after the coordinator unloads it."""
    ring = Ring(work / "unload", repo)
    ring.start_coordinator()

    def rss() -> int:
        time.sleep(1.0)  # a heartbeat or two later
        nodes = http("GET", ring.url + "/v2/cluster")[1]["nodes"]
        return int(nodes[0]["load"]["rss"])

    try:
        ring.start_node("n0", threads=1)
        ring.wait_members(1)
        empty = rss()
        ring.load("demo", stages=1, replicas=1)
        ring.wait_ready()
        ring.infer("demo", np.arange(16, dtype=np.int64).reshape(1, 16))
        loaded = rss()
        status, _ = http("POST", f"{ring.url}/v2/repository/models/demo/unload")
        assert status == 200
        return {"rss_before_load": empty, "rss_loaded": loaded, "rss_after_unload": rss()}
    finally:
        ring.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spans", type=int, default=4, help="K identity spans for the hop cost")
    parser.add_argument("--hop-requests", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=6.0, help="throughput window")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-ring-") as tmp:
        work = Path(tmp)
        repo = work / "demo-repo"
        export_model(build_demo_model(), repo, "demo", source_label="builtin:demo")
        # the hop client before (aiohttp's) and after (the lean one), in the same run
        hop_aiohttp = bench_hop(work, args.spans, args.hop_requests, ("--no-lean-hops",))
        hop_unsigned = bench_hop(work, args.spans, args.hop_requests, signed=False)
        hop = bench_hop(work, args.spans, args.hop_requests)
        throughput = bench_throughput(work, repo, args.seconds)
        kill = bench_kill(work, repo)
        unload = bench_unload(work, repo)
    report = {
        "bench": "ring",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpus": os.cpu_count(),
        "hop": hop,
        "hop_aiohttp_client": hop_aiohttp,
        "hop_unsigned": hop_unsigned,
        "throughput": throughput,
        "kill": kill,
        "unload": unload,
    }
    print(
        f"per extra span (identity spans, [1,16,{HIDDEN}] fp32, concurrency 1): "
        f"{hop['per_extra_span_ms']:.3f} ms p50 (aim <= 0.5 ms); 1 span "
        f"{hop['p50_ms_1_span']:.2f} ms, {hop['spans']} spans "
        f"{hop[f'p50_ms_{args.spans}_spans']:.2f} ms; signed with aiohttp's client for hops "
        f"(before): {hop_aiohttp['per_extra_span_ms']:.3f} ms; lean, unsigned: "
        f"{hop_unsigned['per_extra_span_ms']:.3f} ms"
    )
    for label, row in throughput.items():
        print(
            f"demo model, {label}: {row['throughput_rps']:.1f} req/s, p50 {row['p50_ms']:.1f} "
            f"ms, p99 {row['p99_ms']:.1f} ms (concurrency 32)"
        )
    print(
        f"kill -9 of {kill['killed']} under load: {kill['failed']} failed of "
        f"{kill['requests']} requests (concurrency {kill['concurrency']})"
    )
    mib = 2**20
    print(
        f"node RSS: {unload['rss_before_load'] / mib:.0f} MiB empty, "
        f"{unload['rss_loaded'] / mib:.0f} MiB holding the demo model, "
        f"{unload['rss_after_unload'] / mib:.0f} MiB after unload"
    )
    save_report(report, args.out, "ring")
    return 0


if __name__ == "__main__":
    sys.exit(main())
