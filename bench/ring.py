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
import statistics
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

from bench.loadgen import run_load
from bench.report import save_report
from exporter.demo_model import build_demo_model
from exporter.export import export_model
from exporter.package_writer import write_package
from runtime.codec import encode_request
from tests.support.harness import Ring, http

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


HOP_VARIANTS: dict[str, tuple[tuple[str, ...], bool]] = {
    # label: (flags for the coordinator and every node, internal calls signed)
    "aiohttp hop client, signed (before)": (("--no-lean-hops",), True),
    "lean hop client, unsigned": ((), False),
    "lean hop client, signed (default)": ((), True),
}


def _identity_ring(work: Path, repo: Path, k: int, flags: tuple[str, ...], signed: bool) -> Ring:
    ring = Ring(work / f"hop-{k}-{'-'.join(flags) or 'default'}-{signed}", repo, signed=signed)
    try:
        ring.start_coordinator(*flags)
        for i in range(k):
            ring.start_node(f"n{i}", *flags)
        ring.wait_members(k)
        ring.load("identity", stages=k, replicas=1)
        ring.wait_ready()
    except BaseException:
        ring.stop()
        raise
    return ring


def bench_hop(work: Path, spans: int, count: int, rounds: int = 3) -> dict[str, Any]:
    """Per extra span, for every hop variant: rings of 1 and ``spans`` identity spans for all
    variants are started once, then rounds alternate between them (latency at concurrency 1
    swings by 2x between runs on this VM, so only a comparison inside one run means much)."""
    repo = work / "identity-repo"
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
    rings: dict[tuple[str, int], Ring] = {}
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in HOP_VARIANTS}
    try:
        for label, (flags, signed) in HOP_VARIANTS.items():
            for k in (1, spans):
                rings[(label, k)] = _identity_ring(work, repo, k, flags, signed)
        for index in range(rounds):
            order = list(HOP_VARIANTS) if index % 2 == 0 else list(HOP_VARIANTS)[::-1]
            for label in order:
                one = latency_p50(rings[(label, 1)].url, "identity", body, length, count)
                many = latency_p50(rings[(label, spans)].url, "identity", body, length, count)
                samples[label].append((one, many))
    finally:
        for ring in rings.values():
            ring.stop()
    result: dict[str, Any] = {"spans": spans, "rounds": rounds}
    for label, pairs in samples.items():
        one = statistics.median(p[0] for p in pairs)
        many = statistics.median(p[1] for p in pairs)
        per_span = statistics.median((p[1] - p[0]) / (spans - 1) for p in pairs)
        result[label] = {
            "p50_ms_1_span": round(one, 3),
            f"p50_ms_{spans}_spans": round(many, 3),
            "per_extra_span_ms": round(per_span, 3),
            "per_extra_span_ms_rounds": [round((p[1] - p[0]) / (spans - 1), 3) for p in pairs],
        }
    return result


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

        def kill_when_reached() -> None:
            reached.wait(120)
            ring.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_reached)
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
        hop = bench_hop(work, args.spans, args.hop_requests)
        throughput = bench_throughput(work, repo, args.seconds)
        kill = bench_kill(work, repo)
        unload = bench_unload(work, repo)
    report = {
        "bench": "ring",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpus": os.cpu_count(),
        "hop": hop,
        "throughput": throughput,
        "kill": kill,
        "unload": unload,
    }
    for label in HOP_VARIANTS:
        row = hop[label]
        print(
            f"per extra span, {label} (identity spans, [1,16,{HIDDEN}] fp32, concurrency 1, "
            f"median of {hop['rounds']} alternating rounds): {row['per_extra_span_ms']:.3f} ms "
            f"p50 (aim <= 0.5 ms; rounds {row['per_extra_span_ms_rounds']}); 1 span "
            f"{row['p50_ms_1_span']:.2f} ms, {hop['spans']} spans "
            f"{row[f'p50_ms_{args.spans}_spans']:.2f} ms"
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
