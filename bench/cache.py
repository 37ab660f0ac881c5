"""The result cache and async jobs in one run (loopback, bounded):

1. hit versus miss through the coordinator: p50/p99 latency at concurrency 1 and throughput at
   concurrency 32 (misses send ``Cache-Control: no-cache`` so the ring computes every one);
2. the in-process lookup of a 4 KB input (key hashing + LMDB get);
3. the hit rate on a Zipf trace against what the admission policy predicts;
4. async jobs accepted per second (202 answered after a durable write).

    python -m bench.cache [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.loadgen import run_load
from bench.report import save_report
from cache.keys import cache_key
from cache.result_cache import CacheSettings, ResultCache
from exporter.demo_model import build_demo_model
from exporter.export import export_model
from runtime.codec import encode_request
from tests.support.harness import Ring

DIGEST = "sha256:" + "ab" * 32


def through_coordinator(ring: Ring, seconds: float) -> dict[str, Any]:
    ids = np.arange(16, dtype=np.int64).reshape(1, 16)
    body, length = encode_request({"input_ids": ids})
    url = f"{ring.url}/v2/models/demo/infer"
    hit = {"Inference-Header-Content-Length": str(length)}
    miss = {**hit, "Cache-Control": "no-cache"}
    out: dict[str, Any] = {}
    for label, headers in (("miss", miss), ("hit", hit)):
        one = asyncio.run(run_load(url, body, headers, 1, seconds, warmup_s=1.0))
        many = asyncio.run(run_load(url, body, headers, 32, seconds, warmup_s=1.0))
        out[label] = {
            "p50_ms": round(one.percentile(50), 3),
            "p99_ms": round(one.percentile(99), 3),
            "throughput_rps_c32": round(many.throughput, 1),
            "failures": one.failures + many.failures,
        }
    return out


def lookup_in_process(work: Path, count: int = 20_000) -> dict[str, float]:
    cache = ResultCache(CacheSettings(path=work / "lookup", admit_after=1))
    cache.start()
    try:
        x = np.random.default_rng(0).normal(size=(1, 1024)).astype(np.float32)  # 4 KB
        output = {"y": np.random.default_rng(1).normal(size=(1, 384)).astype(np.float32)}
        key = cache_key(DIGEST, {"x": x}, None)
        cache.offer(key, output)
        cache.wait_flushed()
        started = time.perf_counter()
        for _ in range(count):
            assert cache.get(cache_key(DIGEST, {"x": x}, None)) is not None
        per = (time.perf_counter() - started) / count
        started = time.perf_counter()
        for _ in range(count):
            cache_key(DIGEST, {"x": x}, None)
        hashing = (time.perf_counter() - started) / count
        return {"lookup_us": round(per * 1e6, 2), "key_us": round(hashing * 1e6, 2)}
    finally:
        cache.close()


def zipf_trace(work: Path, requests: int = 20_000, keys: int = 2_000, k: int = 2) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    trace = [int(v) % keys for v in rng.zipf(1.2, size=requests)]
    cache = ResultCache(CacheSettings(path=work / "zipf", admit_after=k))
    cache.start()
    hits = 0
    try:
        for value in trace:
            x = np.array([[value]], np.int64)
            key = cache_key(DIGEST, {"x": x}, None)
            if cache.get(key) is not None:
                hits += 1
            else:
                cache.offer(key, {"y": x.astype(np.float32)})
    finally:
        cache.close()
    predicted = sum(max(0, n - k) for n in Counter(trace).values()) / requests
    return {
        "requests": requests,
        "K": k,
        "hit_rate": round(hits / requests, 4),
        "predicted": round(predicted, 4),
    }


async def jobs_per_second(ring: Ring, count: int = 500, concurrency: int = 16) -> dict[str, Any]:
    ids = np.arange(8, dtype=np.int64).reshape(1, 8)
    body, length = encode_request({"input_ids": ids})
    headers = {"Inference-Header-Content-Length": str(length), "Prefer": "respond-async"}
    accepted = 0
    queue = list(range(count))

    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            nonlocal accepted
            while queue:
                queue.pop()
                async with session.post(
                    f"{ring.url}/v2/models/demo/infer", data=body, headers=headers
                ) as response:
                    await response.read()
                    accepted += response.status == 202

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        took = time.perf_counter() - started
    return {"submitted": count, "accepted": accepted, "per_second": round(accepted / took, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        export_model(build_demo_model(), repo, "demo", source_label="builtin:demo")
        ring = Ring(work / "ring", repo)
        ring.start_coordinator()
        try:
            ring.start_node("n0", threads=os.cpu_count() or 1)
            ring.wait_members(1)
            ring.load("demo", stages=1, replicas=1)
            ring.wait_ready()
            coordinator = through_coordinator(ring, args.seconds)
            jobs = asyncio.run(jobs_per_second(ring))
        finally:
            ring.stop()
        lookup = lookup_in_process(work)
        zipf = zipf_trace(work)
    report = {
        "bench": "cache",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpus": os.cpu_count(),
        "coordinator": coordinator,
        "lookup": lookup,
        "zipf": zipf,
        "jobs": jobs,
    }
    for label in ("miss", "hit"):
        row = coordinator[label]
        print(
            f"{label:>4} through the coordinator: p50 {row['p50_ms']:.3f} ms, p99 "
            f"{row['p99_ms']:.3f} ms (concurrency 1); {row['throughput_rps_c32']:.0f} req/s "
            f"at concurrency 32"
        )
    print(
        f"aims: hit p50 <= 1 ms, >= 5,000 hits/s; in-process lookup of a 4 KB input: "
        f"{lookup['lookup_us']:.1f} us (key {lookup['key_us']:.1f} us; aim <= 20 us)"
    )
    print(
        f"Zipf a=1.2, K={zipf['K']}: hit rate {zipf['hit_rate']:.4f}, predicted "
        f"{zipf['predicted']:.4f}"
    )
    print(
        f"async jobs: {jobs['per_second']:.0f} accepted/s ({jobs['accepted']} of "
        f"{jobs['submitted']}, each durable before its 202)"
    )
    save_report(report, args.out, "cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
