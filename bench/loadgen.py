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
    fixed_percentiles: tuple[float, float] | None = None  # (p50, p99) when measured elsewhere

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if self.fixed_percentiles is not None and q in (50, 99):
            return self.fixed_percentiles[0 if q == 50 else 1]
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


_WRK_SCRIPT = """
local f = io.open(os.getenv("BENCH_BODY"), "rb"); local body = f:read("*all"); f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/octet-stream"
for line in string.gmatch(os.getenv("BENCH_HEADERS"), "[^\\n]+") do
  local name, value = string.match(line, "^([^:]+): (.*)$")
  wrk.headers[name] = value
end
done = function(summary, latency, requests)
  io.write(string.format("BENCH %d %d %d %.3f %.3f\\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout, summary.duration,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def run_wrk(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float
) -> LoadResult:
    """The same closed loop from wrk (C, one thread): it leaves the cores to the server.

    wrk has no warm-up phase; a 1 s run before the measured one plays that part.
    """
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        body_path = os.path.join(tmp, "body.bin")
        script = os.path.join(tmp, "post.lua")
        with open(body_path, "wb") as handle:
            handle.write(body)
        with open(script, "w") as handle:
            handle.write(_WRK_SCRIPT)
        env = {
            **os.environ,
            "BENCH_BODY": body_path,
            # every header the aiohttp load sends (Cache-Control included), one per line
            "BENCH_HEADERS": "".join(f"{k}: {v}\n" for k, v in headers.items()),
        }
        for duration in (1, max(1, round(seconds))):
            out = subprocess.run(
                ["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "-s", script, url],
                capture_output=True,
                text=True,
                env=env,
                timeout=duration + 30,
                check=True,
            ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("BENCH "))
    requests, errors, duration_us, p50, p99 = line.split()[1:]
    result = LoadResult(
        concurrency, int(duration_us) / 1e6, int(requests) - int(errors), int(errors), []
    )
    result.fixed_percentiles = (float(p50), float(p99))
    return result
