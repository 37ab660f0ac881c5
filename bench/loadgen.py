"""A bounded closed-loop load generator for v2 infer endpoints (loopback only)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import numpy as np


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: int
    failures: int
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def as_dict(self) -> dict[str, float | int]:
        return {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "failures": self.failures,
            "throughput_rps": round(self.throughput, 1),
            "p50_ms": round(self.percentile(50), 3),
            "p99_ms": round(self.percentile(99), 3),
        }


async def run_load(
    url: str,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    seconds: float,
    warmup_s: float = 1.0,
    max_requests: int = 1_000_000,
) -> LoadResult:
    """``concurrency`` workers post ``body`` back to back for warm-up + ``seconds``.

    Only completions inside the measured window count; the run ends after ``seconds`` or
    ``max_requests``, whichever comes first, so it is always bounded.
    """
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    latencies: list[float] = []
    failures = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    end = measure_from + seconds
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal failures
            while True:
                began = time.perf_counter()
                if began >= end or len(latencies) >= max_requests:
                    return
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                finished = time.perf_counter()
                if measure_from <= finished <= end:  # completions inside the window count
                    if ok:
                        latencies.append((finished - began) * 1000)
                    else:
                        failures += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(concurrency, seconds, len(latencies), failures, latencies)
