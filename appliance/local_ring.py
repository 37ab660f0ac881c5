"""``appliance serve``: a coordinator and N local node processes on loopback, one command.

Each node gets 1/N of the memory budget and of the cores (onnxruntime threads), its own cache
folder and a stable id; the demo model (or the given one) is placed as K spans with R replicas.
Ctrl-C or SIGTERM stops the nodes, then the coordinator.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
from aiohttp import web

from appliance.config import CoordinatorConfig
from appliance.coordinator_server import COORDINATOR, build_coordinator_app
from appliance.errors import ConfigError
from appliance.node_server import start_app
from appliance.sd_notify import notify, start_watchdog
from appliance.signing import new_secret, parse_secrets
from appliance.tls import server_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalRing:
    nodes: int = 2
    stages: int = 2
    replicas: int = 1
    model: str = "demo"
    node_log_level: str = "warning"


def node_command(
    index: int,
    coordinator_url: str,
    work: Path,
    threads: int,
    budget: int,
    log_level: str,
    secrets_file: Path,
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "appliance.cli",
        "node",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--join",
        coordinator_url,
        "--node-id",
        f"local-{index}",
        "--model-repo",
        str(work / f"node-{index}"),
        "--intra-op-threads",
        str(threads),
        "--memory-budget",
        str(budget),
        "--log-level",
        log_level,
        "--cluster-secrets-file",
        str(secrets_file),
    ]


def local_secrets_file(config: CoordinatorConfig, work: Path) -> Path:
    """The configured cluster secrets, or a fresh one for this run: the local members sign
    their internal calls like any ring (a file readable by this user only, not a flag: flags
    show in ``ps``)."""
    secrets = parse_secrets(config.cluster_secrets, config.cluster_secrets_file) or [
        new_secret().encode()
    ]
    work.mkdir(parents=True, exist_ok=True)
    path = work / "cluster-secrets"
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(b"".join(s + b"\n" for s in secrets))
    return path


async def run_local_ring(config: CoordinatorConfig, ring: LocalRing, work: Path) -> int:
    if ring.nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {ring.nodes}")
    secrets_file = local_secrets_file(config, work)
    config = replace(config, cluster_secrets=[], cluster_secrets_file=str(secrets_file))
    app = build_coordinator_app(config)
    tls = server_context(config.tls_cert, config.tls_key, config.tls_ca)
    runner, port = await start_app(app, config.host, config.port, config.access_log, tls)
    scheme = "https" if tls else "http"
    url = f"{scheme}://{config.host}:{port}"
    cores = os.cpu_count() or 1
    threads = max(1, cores // ring.nodes)
    budget = psutil.virtual_memory().available // ring.nodes
    processes = [
        # stdout is the coordinator's: its one "listening on" line is what scripts read
        subprocess.Popen(
            node_command(i, url, work, threads, budget, ring.node_log_level, secrets_file),
            stdout=subprocess.DEVNULL,
        )
        for i in range(ring.nodes)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        coordinator = app[COORDINATOR]
        await _wait_for_members(coordinator.cluster, ring.nodes, processes, stop)
        if stop.is_set():
            return 0
        placement = await coordinator.load(ring.model, ring.stages, ring.replicas)
        spans = ", ".join(
            f"segments {s.first}-{s.last} on {'+'.join(s.replicas)}" for s in placement.spans
        )
        log.info("%s placed: %s", ring.model, spans)
        print(
            f"appliance listening on {url} (coordinator + {ring.nodes} nodes; {spans})", flush=True
        )
        while not stop.is_set():
            await asyncio.sleep(0.5)
            dead = [p.pid for p in processes if p.poll() is not None]
            if dead and not stop.is_set():
                log.warning("node process(es) %s exited", dead)
                processes = [p for p in processes if p.poll() is None]
        return 0
    finally:
        log.info("stopping %d node(s) and the coordinator", len(processes))
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        await runner.cleanup()


async def _wait_for_members(
    cluster: object,
    count: int,
    processes: list[subprocess.Popen[bytes]],
    stop: asyncio.Event,
    timeout_s: float = 120,
) -> None:
    from appliance.cluster import Cluster

    assert isinstance(cluster, Cluster)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not stop.is_set():
        if len(cluster.live(time.monotonic())) >= count:
            return
        failed = [p.args for p in processes if p.poll() is not None]
        if failed:
            raise ConfigError(f"a node process exited while starting: {failed[0]!r}")
        await asyncio.sleep(0.1)
    if not stop.is_set():
        raise ConfigError(
            f"only {len(cluster.live(time.monotonic()))} of {count} nodes joined "
            f"within {timeout_s:.0f}s"
        )


async def run_coordinator(config: CoordinatorConfig) -> int:
    app = build_coordinator_app(config)
    tls = server_context(config.tls_cert, config.tls_key, config.tls_ca)
    runner, port = await start_app(app, config.host, config.port, config.access_log, tls)
    scheme = "https" if tls else "http"
    print(f"appliance coordinator listening on {scheme}://{config.host}:{port}", flush=True)
    notify(f"STATUS=listening on {config.host}:{port}")
    notify("READY=1")
    watchdog = start_watchdog()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if config.models:
        loop.create_task(_place_when_joined(app, config))
    await stop.wait()
    notify("STOPPING=1")
    if watchdog is not None:
        watchdog.cancel()
    await runner.cleanup()
    return 0


async def _place_when_joined(app: web.Application, config: CoordinatorConfig) -> None:
    coordinator = app[COORDINATOR]
    for name in config.models:
        while name not in coordinator.placements:
            if coordinator.cluster.live(time.monotonic()):
                try:
                    await coordinator.load(name, None, None)
                    break
                except Exception as exc:  # retried: nodes may still be joining
                    log.warning("placing %s failed (%s); retrying", name, exc)
            await asyncio.sleep(2)
