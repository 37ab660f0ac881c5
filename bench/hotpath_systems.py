"""The systems bench/hotpath.py puts side by side, and how each one is measured.

In-process runs are timed in this process; served systems get bench/loadgen.py's closed loop
from this process, and every served figure carries the CPU the load generator (this process)
and the server (its process tree) spent in the same interval, read with psutil.
"""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.loadgen import run_load
from bench.serving import NodeProcess
from runtime.package import SpanRunner, load_span, open_package
from runtime.session import SessionSettings

# Busy for duty x 10 ms out of every 10 ms: a share of one core taken from whatever else runs,
# as the load generator takes it from the server.
_STEALER = """
import sys, time
duty, period = float(sys.argv[1]), 0.010
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < duty * period:
        pass
    time.sleep(max(0.0, period - (time.perf_counter() - start)))
"""


class CpuMeter:
    """CPU seconds of processes (with the children each has at start, unless ``alone``) over
    an interval. This process is measured alone: the servers and stealers are its children."""

    def __init__(self, pids: list[int], alone: bool = False) -> None:
        self.processes: list[psutil.Process] = []
        for pid in pids:
            process = psutil.Process(pid)
            self.processes += [process] if alone else [process, *process.children(True)]
        self.before = self._seconds()
        self.started = time.perf_counter()

    def _seconds(self) -> float:
        total = 0.0
        for process in self.processes:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def cores(self) -> float:
        """Mean cores busy since the start (1.0 = one core all the time)."""
        elapsed = time.perf_counter() - self.started
        return (self._seconds() - self.before) / elapsed if elapsed else 0.0


class Stealer:
    """Processes that keep ``cores`` of CPU busy while they live (one per started core)."""

    def __init__(self, cores: float) -> None:
        count = max(1, math.ceil(cores))
        duty = str(min(1.0, cores / count))
        self.processes = [
            subprocess.Popen([sys.executable, "-c", _STEALER, duty]) for _ in range(count)
        ]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
            process.wait(timeout=10)


def load_runner(repo: Path, model: str, threads: int) -> SpanRunner:
    return load_span(open_package(repo, model), SessionSettings("cpu", intra_op_threads=threads))


def in_process(
    runner: SpanRunner,
    feeds: dict[str, np.ndarray],
    seconds: float,
    in_flight: int = 1,
    steal_cores: float = 0.0,
) -> dict[str, Any]:
    """Rows/s of ``runner.run`` on one pre-built batch, ``in_flight`` threads calling it back
    to back (onnxruntime runs one session concurrently), optionally with CPU stolen."""
    rows = len(next(iter(feeds.values())))
    runner.run(feeds)
    stealer = Stealer(steal_cores) if steal_cores > 0 else None
    try:
        runs = [0] * in_flight
        latencies: list[float] = []
        end = time.perf_counter() + seconds
        meter = CpuMeter([psutil.Process().pid], alone=True)

        def loop(slot: int) -> None:
            while True:
                began = time.perf_counter()
                if began >= end:
                    return
                runner.run(feeds)
                runs[slot] += 1
                latencies.append((time.perf_counter() - began) * 1000)

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(in_flight)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        server_cores = meter.cores()
    finally:
        if stealer is not None:
            stealer.stop()
    return {
        "batch": rows,
        "in_flight": in_flight,
        "steal_cores": steal_cores,
        "runs": sum(runs),
        "rows_per_s": round(sum(runs) * rows / elapsed, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 3),
        "p99_ms": round(float(np.percentile(latencies, 99)), 3),
        "generator_cores": None,
        "server_cores": round(server_cores, 2),
    }


async def served(
    url: str,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    seconds: float,
    server_pid: int,
    warmup_s: float = 1.0,
) -> dict[str, Any]:
    """bench/loadgen.py's closed loop, with this process's and the server's CPU beside it."""
    generator = CpuMeter([psutil.Process().pid], alone=True)
    server = CpuMeter([server_pid])
    result = await run_load(url, body, headers, concurrency, seconds, warmup_s)
    row: dict[str, Any] = result.as_dict()
    row["rows_per_s"] = row["throughput_rps"]
    row["generator_cores"] = round(generator.cores(), 2)
    row["server_cores"] = round(server.cores(), 2)
    # cores / (requests per second) = CPU seconds per request
    throughput = result.throughput
    row["generator_us_per_request"] = (
        round(row["generator_cores"] / throughput * 1e6, 1) if throughput else None
    )
    return row


class ServeProcess:
    """``appliance serve`` (a coordinator and ``nodes`` local node processes) on 127.0.0.1."""

    def __init__(
        self, repo: Path, model: str, nodes: int, state_dir: Path, extra: tuple[str, ...] = ()
    ) -> None:
        command = [
            sys.executable,
            "-m",
            "appliance.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model-repo",
            str(repo),
            "--models",
            model,
            "--nodes",
            str(nodes),
            "--state-dir",
            str(state_dir),
            "--log-level",
            "warning",
            *extra,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # printed once every model is placed
        match = re.search(r"http://[^\s]+", line)
        if not match or "listening" not in line:
            self.stop()
            raise RuntimeError(f"appliance serve did not start: {line!r}")
        self.url = match.group(0)

    def stop(self) -> None:
        self.process.terminate()  # the nodes first, then the coordinator
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


async def wait_answers(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> None:
    """Until one infer answers 200 (a node's warm-up, a coordinator's placement)."""
    import aiohttp

    end = time.monotonic() + timeout_s
    last = ""
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < end:
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    if response.status == 200:
                        await response.read()
                        return
                    last = f"{response.status} {await response.text()}"
            except aiohttp.ClientError as exc:
                last = repr(exc)
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s}s: {last}")


async def interleaved_c1(
    urls: dict[str, str],
    runs: dict[str, Callable[[], Any]],
    body: bytes,
    headers: dict[str, str],
    seconds: float,
) -> dict[str, dict[str, Any]]:
    """Concurrency 1, one request to each system in turn (the order rotated every cycle) for
    ``seconds``: the systems share every moment of a shared machine's load, so their p50s
    compare where points measured one after another would each catch another load."""
    import aiohttp

    names = [*urls, *runs]
    latencies: dict[str, list[float]] = {name: [] for name in names}
    failures = dict.fromkeys(names, 0)
    async with aiohttp.ClientSession() as session:

        async def call(name: str) -> bool:
            if name in runs:
                runs[name]()  # in process: blocks this loop, as nothing else runs on it
                return True
            async with session.post(urls[name], data=body, headers=headers) as response:
                await response.read()
                return response.status == 200

        for name in names:  # warm: connections open, allocations made
            await call(name)
        end, cycle = time.perf_counter() + seconds, 0
        while time.perf_counter() < end:
            shift = cycle % len(names)
            for name in names[shift:] + names[:shift]:
                began = time.perf_counter()
                ok = await call(name)
                if ok:
                    latencies[name].append((time.perf_counter() - began) * 1000)
                else:
                    failures[name] += 1
            cycle += 1
    return {
        name: {
            "requests": len(values),
            "failures": failures[name],
            "p50_ms": round(float(np.percentile(values, 50)), 3) if values else None,
            "p99_ms": round(float(np.percentile(values, 99)), 3) if values else None,
        }
        for name, values in latencies.items()
    }


async def run_counts(stats_url: str) -> tuple[int, int]:
    """(rows, runs) a node's batcher has run for a model so far (its v2 statistics)."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(stats_url) as response:
        response.raise_for_status()
        (model,) = (await response.json())["model_stats"]
    return int(model["inference_count"]), int(model["execution_count"])


def start_node(
    repo: Path, model: str, threads: int, batch: int, runs_in_flight: int = 1
) -> NodeProcess:
    """A standalone node; ``threads`` as its intra_op_threads (-1 auto, 0 onnxruntime's)."""
    flags = ["--device", "cpu", f"--intra-op-threads={threads}"]
    flags += ["--max-batch-size", str(batch), "--runs-in-flight", str(runs_in_flight)]
    node = NodeProcess(repo, model, flags)
    try:
        asyncio.run(node.wait_ready(timeout_s=300))
    except BaseException:
        node.stop()
        raise
    return node
