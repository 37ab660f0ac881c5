"""``appliance serve``: a coordinator and N local node processes on loopback, one command.

Each node counts 1/N of the host's memory (its budget and, every heartbeat, what is free) and
gets 1/N of the cores (onnxruntime threads), its own cache folder and a stable id; every model
of the repository is placed (as its package's default stages, or K spans) with R replicas.
Ctrl-C or SIGTERM stops the nodes first (each tells the coordinator it leaves), then the
coordinator.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web

from appliance.config import CoordinatorConfig, entries_with_file
from appliance.coordinator.app import build_coordinator_app
from appliance.coordinator.cluster import Cluster
from appliance.coordinator.keys import COORDINATOR
from appliance.coordinator.placement.types import Placement
from appliance.coordinator.retry import Retry
from appliance.coordinator.service import Coordinator
from appliance.errors import ConfigError, NoLiveReplica
from appliance.http.server import Listening, Server, listen
from appliance.ring.local_peers import LocalPeers
from appliance.sd_notify import notify
from appliance.security.signing import new_secret, parse_secrets
from runtime.errors import ModelNotFound
from runtime.package import list_repository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalRing:
    nodes: int = 3
    stages: int = 0  # per model: its package's default_stages, else one span per node
    replicas: int = 1
    models: tuple[str, ...] = ("demo",)
    node_log_level: str = "warning"
    node_config: str | None = None  # a NodeConfig TOML the nodes read; their flags win
    in_process_node: bool = False  # node 0 runs in the coordinator's process
    node_threads: int = 0  # each node's onnxruntime threads; 0: the cores shared out
    alone_threads: int = -1  # each node's alone_intra_op_threads; -1: alone_threads_per_node


def local_stages(asked: int, default_stages: int, segments: int, nodes: int) -> tuple[int, str]:
    """How many spans a model gets on ``appliance serve``, and why (a pure choice): the
    --stages asked, else the grouping its package records, else one span per local node; never
    more than its segments (a plain model.onnx is one span, replicated instead)."""
    if asked:
        wanted, why = asked, f"--stages {asked}"
    elif default_stages > 1:
        wanted, why = default_stages, "its package's default_stages"
    else:
        wanted, why = nodes, f"one span per local node ({nodes})"
    if wanted > segments:
        return segments, f"{why}, but it has {segments} segment(s)"
    return wanted, why


def threads_per_node(ring: LocalRing, cores: int) -> int:
    """Each local node's onnxruntime threads: ``node_threads`` when given, else the cores
    shared out among the nodes (at least 1), so nodes that all compute at once (replicas under
    load, a chain's spans with cohorts in flight) do not oversubscribe the cores."""
    return ring.node_threads or max(1, cores // ring.nodes)


def alone_threads_per_node(ring: LocalRing, cores: int) -> int:
    """Each local node's ``alone_intra_op_threads``: ``alone_threads`` when given, else all the
    cores where ``threads_per_node`` shared them out among several nodes (a chain serving one
    stream computes on one node at a time: 1.21x tok/s with 2 threads against 1 on 3 spans),
    else 0 (none: the node's threads are already what it was given)."""
    if ring.alone_threads >= 0:
        return ring.alone_threads
    shared = not ring.node_threads and threads_per_node(ring, cores) < cores
    return cores if shared else 0


def node_command(
    index: int,
    coordinator_url: str,
    work: Path,
    threads: int,
    share: int,
    log_level: str,
    secrets_file: Path,
    shared: Sequence[str] = (),
    config_file: str | None = None,
    alone_threads: int = 0,
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "appliance.cli",
        "node",
        *(["--config", config_file] if config_file else []),
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
        "--alone-intra-op-threads",
        str(alone_threads),
        "--memory-share",
        str(share),
        "--log-level",
        log_level,
        "--cluster-secrets-file",
        str(secrets_file),
        *shared,
    ]


def shared_settings(config: CoordinatorConfig, work: Path) -> list[str]:
    """The flags the local nodes take from the coordinator's settings: the same TLS (a node
    serves HTTPS with the same certificate and verifies its peers with the same CA) and the
    same tokens (handed over in a file readable by this user only, as the cluster secret)."""
    flags: list[str] = []
    if config.tls_cert:
        flags += ["--tls-cert", config.tls_cert, "--tls-key", config.tls_key]
        flags += ["--tls-ca", config.tls_ca]
    if config.tls_server_name:
        flags += ["--tls-server-name", config.tls_server_name]
    tokens = entries_with_file(config.tokens, config.tokens_file, "tokens_file")
    if tokens:
        path = work / "tokens"
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text("".join(t + "\n" for t in tokens))
        flags += ["--tokens-file", str(path)]
    if config.metrics_public:
        flags.append("--metrics-public")
    return flags


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


class _Nodes:
    """The local node processes: started once the coordinator listens, stopped before it."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, commands: list[list[str]]) -> None:
        # stdout is the coordinator's: its one "listening on" line is what scripts read
        self.processes = [subprocess.Popen(c, stdout=subprocess.DEVNULL) for c in commands]

    async def stop(self) -> None:
        log.info("stopping %d node(s), then the coordinator", len(self.processes))
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes:
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # not wait(): the coordinator hears their goodbyes
            if process.poll() is None:
                process.kill()


async def run_local_ring(config: CoordinatorConfig, ring: LocalRing, work: Path) -> int:
    if ring.nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {ring.nodes}")
    secrets_file = local_secrets_file(config, work)
    config = replace(config, cluster_secrets=[], cluster_secrets_file=str(secrets_file))
    if config.tls_cert and not config.tls_ca:
        # one self-signed certificate for every local member: it is its own CA
        config = replace(config, tls_ca=config.tls_cert)
    shared = shared_settings(config, work)
    local = LocalPeers() if ring.in_process_node else None
    app = build_coordinator_app(config, local)
    server = Server(app, config, None)  # the listening line comes once the ring is placed
    nodes = _Nodes()
    server.before_stop.append(nodes.stop)

    async def main(listening: Listening, stop: asyncio.Event) -> int:
        threads = threads_per_node(ring, os.cpu_count() or 1)
        alone = alone_threads_per_node(ring, os.cpu_count() or 1)
        level, share = ring.node_log_level, ring.nodes
        commands = [
            node_command(
                i,
                listening.url,
                work,
                threads,
                share,
                level,
                secrets_file,
                shared,
                ring.node_config,
                alone,
            )  # fmt: skip
            for i in range(ring.nodes)
        ]
        if local is not None:
            inner = await InProcessNode.start(commands.pop(0)[4:], local)  # after "node"
            server.before_stop.insert(1, inner.stop)  # with the other nodes, before the end
        nodes.start(commands)
        coordinator = app[COORDINATOR]
        await _wait_for_members(coordinator.cluster, ring.nodes, nodes.processes, stop)
        if stop.is_set():
            return 0
        placed = await _place_all(coordinator, ring)
        notify(f"STATUS=serving {', '.join(placed) or 'nothing'} on {ring.nodes} local node(s)")
        notify("READY=1")
        inside = ", the first in this process" if local is not None else ""
        print(
            f"appliance listening on {listening.url} (coordinator + {ring.nodes} nodes{inside}; "
            f"{'; '.join(placed.values()) or 'no model placed: see the log'})",
            flush=True,
        )
        while not stop.is_set():
            await asyncio.sleep(0.5)
            dead = [p.pid for p in nodes.processes if p.poll() is not None]
            if dead and not stop.is_set():
                log.warning("node process(es) %s exited", dead)
                nodes.processes = [p for p in nodes.processes if p.poll() is None]
        return 0

    return await server.serve(main)


@dataclass
class InProcessNode:
    """A node in the coordinator's process: its own app and socket (for the other members),
    membership as any node's, and its ring calls registered in ``local`` for the coordinator."""

    app: web.Application
    listening: Listening
    membership: asyncio.Task[None]
    local: LocalPeers

    @classmethod
    async def start(cls, argv: list[str], local: LocalPeers) -> InProcessNode:
        from appliance.cli import node_config_of
        from appliance.node.membership import start_membership
        from appliance.node.server import build_node_app, join_local_peers

        config = node_config_of(argv)  # the flags a node process would get; logging is ours
        app = build_node_app(config, local)
        listening = await listen(app, config)
        join_local_peers(app, listening.url, local)
        log.info("node %s runs in this process, listening on %s", config.node_id, listening.url)
        return cls(app, listening, start_membership(app, listening.url), local)

    async def stop(self) -> None:
        from appliance.node.membership import leave

        self.membership.cancel()  # no heartbeat may re-announce a node that is leaving
        await leave(self.app)
        self.local.remove(self.listening.url)
        await self.listening.runner.cleanup()


async def _place_all(coordinator: Coordinator, ring: LocalRing) -> dict[str, str]:
    """Every model, each as it can be placed; one that cannot is logged and skipped: it never
    keeps the others from being served."""
    placed: dict[str, str] = {}
    for name in ring.models:
        try:
            entry = coordinator.entry(name)
            default = len(entry.manifest.default_stages)
            stages, why = local_stages(ring.stages, default, len(entry.sizes), ring.nodes)
            replicas = max(1, min(ring.replicas, ring.nodes))
            if stages == 1 and ring.replicas == 1 and ring.nodes > 1:
                replicas = ring.nodes  # one span: a replica on every node shares the load
            placement = _restored(coordinator, name, stages, replicas)
            if placement is None or not await _routable(coordinator, name):
                placement = await coordinator.load(name, stages, replicas)
            else:
                why += "; kept from the last run"
        except Exception as exc:  # typed errors say why; the ring serves the others
            log.error("%s is not served: %s", name, exc)
            continue
        spans = ", ".join(
            f"segments {s.first}-{s.last} on {'+'.join(s.replicas)}" for s in placement.spans
        )
        log.info("%s placed as %d span(s) (%s): %s", name, stages, why, spans)
        placed[name] = f"{name}: {spans}"
    return placed


def _restored(coordinator: Coordinator, name: str, stages: int, replicas: int) -> Placement | None:
    """The placement the last run of this state dir pinned, when it still fits: the newest
    version, these stages and replicas, every replica a live member. Placing anew would shuffle
    spans among equal local nodes (link costs are noise between them) and reload every one."""
    placement, served = coordinator.placements.get(name), coordinator.models.get(name)
    if placement is None or served is None:
        return None
    newest = max(list_repository(coordinator.repo).get(name, [0]))
    live = {m.node_id for m in coordinator.cluster.live(time.monotonic())}
    fits = len(placement.spans) == stages and all(
        len(s.replicas) == replicas and set(s.replicas) <= live for s in placement.spans
    )
    return placement if fits and served.version == str(newest) else None


async def _routable(coordinator: Coordinator, name: str, timeout_s: float = 300) -> bool:
    """Wait until every span of a kept placement has a live replica holding it (the upkeep
    loads them on the members the placement names); False past ``timeout_s``."""
    entry = coordinator.entry(name)
    end = time.monotonic() + timeout_s
    while True:
        try:
            coordinator.cluster.route(name, entry.digest, len(entry.sizes),
                                      coordinator.placements[name], time.monotonic(),
                                      silent_ok=False)  # fmt: skip
            return True
        except (NoLiveReplica, ModelNotFound, KeyError):
            if time.monotonic() > end:
                log.warning("%s: the placement kept from the last run has no live replica of "
                            "every span after %.0fs; placing it anew", name, timeout_s)  # fmt: skip
                return False
            await asyncio.sleep(0.2)


async def _wait_for_members(
    cluster: Cluster,
    count: int,
    processes: list[subprocess.Popen[bytes]],
    stop: asyncio.Event,
    timeout_s: float = 120,
) -> None:
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
    server = Server(app, config, "appliance coordinator")

    async def main(listening: Listening, stop: asyncio.Event) -> int:
        notify(f"STATUS=listening on {listening.url}")
        notify("READY=1")
        placing = [asyncio.get_running_loop().create_task(_place_when_joined(app, config))]
        await stop.wait()
        for task in placing:
            task.cancel()
        return 0

    return await server.serve(main)


async def _place_when_joined(app: web.Application, config: CoordinatorConfig) -> None:
    coordinator = app[COORDINATOR]
    for name in config.models:
        retry = Retry()
        while name not in coordinator.placements:
            now = time.monotonic()
            if coordinator.cluster.live(now) and now >= retry.next_at:
                try:
                    await coordinator.load(name, None, None)
                    break
                except Exception as exc:  # retried: nodes may still be joining
                    retry.failed(now, f"placing {name} failed: {exc}")
            await asyncio.sleep(0.5)
