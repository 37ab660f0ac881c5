"""The Ray Serve side of ``bench/ray_serve.py``: the driver, the deployment and the load.

Run only by ``bench/ray_serve.py``, with the Ray venv's python, inside ``unshare --net`` (a
network namespace with nothing but loopback)::

    <ray-venv>/bin/python bench/ray_app.py CONFIG.json

It must not import project modules (the Ray venv does not have them). It starts Ray on this
namespace's loopback, deploys one replica serving the ONNX model with onnxruntime (with or
without ``@serve.batch``), checks one answer against a local session, drives the same closed loop
as ``bench/loadgen.py`` (aiohttp, keep-alive) at each concurrency and prints one
``RAYBENCH {json}`` line per result; then ``serve.shutdown()`` and ``ray.shutdown()``.

Protocol, the cheapest fair one: the request body is the raw little-endian bytes of every model
input (one sample, the config's order, shapes and dtypes) concatenated; the response body is the
raw bytes of the first output.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

MARK = "RAYBENCH "


def emit(kind: str, payload: dict[str, Any]) -> None:
    print(MARK + json.dumps({"kind": kind, **payload}), flush=True)


def session_options(threads: int) -> Any:
    """The node's session options (runtime/session.py): no spinning pools, inter-op 1."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


class Codec:
    """Raw-bytes bodies: inputs concatenated in the config's order, one sample per body."""

    def __init__(self, inputs: list[dict[str, Any]]) -> None:
        self.specs = [
            (spec["name"], np.dtype(spec["dtype"]), tuple(spec["shape"])) for spec in inputs
        ]
        self.sizes = [dtype.itemsize * int(np.prod(shape)) for _, dtype, shape in self.specs]
        self.body_size = sum(self.sizes)

    def decode(self, body: bytes) -> dict[str, np.ndarray]:
        if len(body) != self.body_size:
            raise ValueError(f"body of {len(body)} bytes, expected {self.body_size}")
        feeds, offset = {}, 0
        for (name, dtype, shape), size in zip(self.specs, self.sizes, strict=True):
            feeds[name] = np.frombuffer(body, dtype, size // dtype.itemsize, offset).reshape(shape)
            offset += size
        return feeds


def build_app(config: dict[str, Any]) -> Any:
    """The Serve application: one replica, batched with ``@serve.batch`` or not.

    Like the node's batcher, one session run is in flight at a time, on a thread of its own,
    so the replica's event loop keeps taking requests (and filling the next batch) meanwhile.
    """
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    batched = bool(config["batched"])
    max_batch_size = int(config["max_batch_size"])
    batch_wait_s = float(config["batch_wait_s"])

    @serve.deployment(
        num_replicas=1,
        max_ongoing_requests=int(config["max_ongoing_requests"]),
        ray_actor_options={"num_cpus": float(config["replica_num_cpus"])},
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    class OnnxModel:
        def __init__(self) -> None:
            import onnxruntime as ort

            self.session = ort.InferenceSession(
                config["onnx_path"],
                sess_options=session_options(int(config["threads"])),
                providers=["CPUExecutionProvider"],
            )
            self.output = self.session.get_outputs()[0].name
            self.codec = Codec(config["inputs"])
            self.rows = int(config["inputs"][0]["shape"][0])
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="onnx-run")
            self.runs = 0
            self.inferred = 0

        def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
            out: np.ndarray = self.session.run([self.output], feeds)[0]
            self.runs += 1
            self.inferred += len(out) // self.rows
            return np.ascontiguousarray(out)

        def stats(self) -> dict[str, int]:
            """Session runs and requests so far (for the mean batch size), and the niceness."""
            niceness = os.getpriority(os.PRIO_PROCESS, 0)
            return {"runs": self.runs, "inferred": self.inferred, "niceness": niceness}

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def infer_batch(self, bodies: list[bytes]) -> list[bytes]:
            decoded = [self.codec.decode(body) for body in bodies]
            feeds = {name: np.concatenate([d[name] for d in decoded]) for name in decoded[0]}
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(self.executor, self.run, feeds)
            r = self.rows
            return [out[i * r : (i + 1) * r].tobytes() for i in range(len(bodies))]

        async def infer_one(self, body: bytes) -> bytes:
            feeds = self.codec.decode(body)
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(self.executor, self.run, feeds)
            return out.tobytes()

        async def __call__(self, request: Request) -> Response:
            body = await request.body()
            try:
                out = await (self.infer_batch(body) if batched else self.infer_one(body))
            except ValueError as exc:
                return Response(str(exc), status_code=400)
            return Response(out, media_type="application/octet-stream")

    deployment: Any = OnnxModel  # a serve.Deployment, whatever a type checker sees
    return deployment.bind()


async def run_load(
    url: str,
    body: bytes,
    concurrency: int,
    seconds: float,
    warmup_s: float,
    max_requests: int,
) -> dict[str, Any]:
    """bench/loadgen.py's run_load, copied: ``concurrency`` keep-alive workers post ``body``
    back to back for warm-up + ``seconds``; only completions inside the window count; it ends
    after ``seconds`` or ``max_requests``, whichever comes first."""
    import aiohttp

    headers = {"Content-Type": "application/octet-stream"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    latencies: list[float] = []
    failures = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    end = measure_from + seconds
    # the load generator's CPU: this thread's (the event loop's), not Ray's driver threads
    cpu_before, server_before = time.thread_time(), others_cpu_seconds()
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
                if measure_from <= finished <= end:
                    if ok:
                        latencies.append((finished - began) * 1000)
                    else:
                        failures += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    generator_cores = (time.thread_time() - cpu_before) / wall if wall else 0.0
    server_cores = (others_cpu_seconds() - server_before) / wall if wall else 0.0

    def pct(q: float) -> float:
        return float(np.percentile(latencies, q)) if latencies else float("nan")

    return {
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "requests": len(latencies),
        "failures": failures,
        "throughput_rps": round(len(latencies) / seconds if seconds else 0.0, 1),
        "p50_ms": round(pct(50), 3),
        "p99_ms": round(pct(99), 3),
        "generator_cores": round(generator_cores, 2),
        "server_cores": round(server_cores, 2),
    }


def others_cpu_seconds() -> float:
    """CPU seconds of every other process in this PID namespace: Ray and its ingress, the
    server side of the load (the driver is this process: the load generator and little else)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        if stat.parent.name == str(os.getpid()):
            continue
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / tick


def haproxy_processes() -> int:
    """Processes named haproxy in this PID namespace: proof the HAProxy ingress really runs."""
    count = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            count += comm.read_text().strip() == "haproxy"
        except OSError:
            continue
    return count


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def expected_output(config: dict[str, Any], body: bytes) -> np.ndarray:
    """The first output for the sample from a local session, to check the served answer."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        config["onnx_path"], sess_options=session_options(1), providers=["CPUExecutionProvider"]
    )
    feeds = Codec(config["inputs"]).decode(body)
    out: np.ndarray = session.run([session.get_outputs()[0].name], feeds)[0]
    return out


def main(config_path: str) -> int:
    import aiohttp
    import onnxruntime as ort
    import ray
    from ray import serve

    config = json.loads(Path(config_path).read_text())
    body = Path(config["body_path"]).read_bytes()
    expected = expected_output(config, body)
    began = time.perf_counter()
    ray.init(
        num_cpus=int(config["num_cpus"]),
        include_dashboard=False,
        object_store_memory=int(config["object_store_bytes"]),
        _temp_dir=config["ray_temp_dir"],
        logging_level="WARNING",
    )
    try:
        port = free_port()
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        handle = serve.run(build_app(config), name="onnx", route_prefix="/")
        url = f"http://127.0.0.1:{port}/"
        emit("ready", {"url": url, "startup_s": round(time.perf_counter() - began, 2)})

        request = urllib.request.Request(url, data=body, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.frombuffer(response.read(), expected.dtype).reshape(expected.shape)
        close = bool(np.allclose(served, expected, rtol=1e-3, atol=1e-4))
        emit("check", {"matches_local_session": close, "output_shape": list(expected.shape)})
        if not close:
            return 3

        for concurrency in config["concurrency"]:
            before = handle.stats.remote().result()
            row = asyncio.run(
                run_load(
                    url,
                    body,
                    int(concurrency),
                    float(config["seconds"]),
                    float(config["warmup_s"]),
                    int(config["max_requests"]),
                )
            )
            after = handle.stats.remote().result()
            runs = after["runs"] - before["runs"]
            row["mean_batch"] = (
                round((after["inferred"] - before["inferred"]) / runs, 2) if runs else 0.0
            )
            emit("row", row)

        emit(
            "settings",
            {
                "ray_version": ray.__version__,
                "onnxruntime_version": ort.__version__,
                "numpy_version": np.__version__,
                "aiohttp_version": aiohttp.__version__,
                "python": sys.version.split()[0],
                "num_replicas": 1,
                "max_ongoing_requests": int(config["max_ongoing_requests"]),
                "serve_batch": bool(config["batched"]),
                "ingress": "haproxy" if config.get("haproxy") else "default proxy",
                "RAY_SERVE_ENABLE_HA_PROXY": os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", ""),
                "haproxy_processes": haproxy_processes(),
                "max_batch_size": int(config["max_batch_size"]) if config["batched"] else 1,
                "batch_wait_timeout_s": float(config["batch_wait_s"]) if config["batched"] else 0,
                "max_concurrent_batches": 1,
                "runs_in_flight": 1,
                "intra_op_num_threads": int(config["threads"]),
                "inter_op_num_threads": 1,
                "allow_spinning": "0",
                "graph_optimization": "ORT_ENABLE_ALL",
                "ray_num_cpus": int(config["num_cpus"]),
                "replica_num_cpus": float(config["replica_num_cpus"]),
                "access_log": False,
                "replica_niceness": handle.stats.remote().result()["niceness"],
                "http": url,
                "protocol": "raw little-endian input bytes in, raw first-output bytes out",
                "client": "aiohttp keep-alive closed loop (bench/loadgen.py's), in the driver",
                "warmup_s": float(config["warmup_s"]),
                "max_requests": int(config["max_requests"]),
            },
        )
        return 0
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
