"""Shared fixtures: real node servers and a real coordinator on port 0, in the test's process
(as uvicorn's tests start a real server), over repositories of tiny models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from appliance.config import CoordinatorConfig, NodeConfig
from appliance.coordinator.app import build_coordinator_app
from appliance.coordinator.keys import COORDINATOR
from appliance.coordinator.service import Coordinator
from appliance.http.server import start_app
from appliance.node.keys import REGISTRY
from appliance.node.membership import start_membership
from appliance.node.server import build_node_app, join_local_peers
from appliance.ring.local_peers import LocalPeers


@dataclass
class RunningNode:
    url: str
    app: web.Application
    runner: web.AppRunner
    client: aiohttp.ClientSession


async def wait_ready(client: aiohttp.ClientSession, url: str, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        async with client.get(url + "/v2/health/ready") as response:
            if response.status == 200:
                return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


StartNode = Callable[..., Coroutine[Any, Any, RunningNode]]


@pytest.fixture
async def start_node() -> AsyncIterator[StartNode]:
    """Start node servers in this test's loop; each is stopped at the end of the test."""
    started: list[RunningNode] = []

    async def start(repo: Path, wait: bool = True, **settings: Any) -> RunningNode:
        base = NodeConfig(model_repo=str(repo), port=0, intra_op_threads=1)
        config = replace(base, **settings)
        app = build_node_app(config)
        runner, port = await start_app(app, "127.0.0.1", 0)
        client = aiohttp.ClientSession()
        node = RunningNode(f"http://127.0.0.1:{port}", app, runner, client)
        started.append(node)
        if wait:
            # ready also needs every model slot filled; wait for the loader to finish
            await wait_ready(client, node.url)
            assert app[REGISTRY].all_ready()
        return node

    yield start
    for node in started:
        await node.client.close()
        await node.runner.cleanup()


@dataclass
class RunningCoordinator:
    url: str
    app: web.Application
    runner: web.AppRunner
    client: aiohttp.ClientSession
    nodes: list[RunningNode]

    @property
    def service(self) -> Coordinator:
        return self.app[COORDINATOR]

    async def wait_members(self, count: int, timeout_s: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while len(self.service.cluster.live(loop.time())) < count:
            if loop.time() > end:
                raise TimeoutError(f"only {len(self.service.cluster.members)} of {count} joined")
            await asyncio.sleep(0.02)


StartCoordinator = Callable[..., Coroutine[Any, Any, RunningCoordinator]]


@pytest.fixture
async def start_coordinator(tmp_path: Path) -> AsyncIterator[StartCoordinator]:
    """A coordinator and ``nodes`` ring nodes joined to it, all in this test's loop on port 0
    (the ring's real HTTP, signatures and hops; only the processes are shared)."""
    started: list[RunningCoordinator] = []
    tasks: list[asyncio.Task[None]] = []

    async def start(
        repo: Path,
        nodes: int = 2,
        node_settings: dict[str, Any] | list[dict[str, Any]] | None = None,
        access_log: bool = False,
        in_process: bool = False,
        **settings: Any,
    ) -> RunningCoordinator:
        """``in_process``: the nodes and the coordinator call each other as the members of one
        process do (``appliance serve --in-process-node``): function calls, not HTTP."""
        secret = "s" * 40
        local = LocalPeers() if in_process else None
        config = CoordinatorConfig(
            model_repo=str(repo),
            port=0,
            state_dir=str(tmp_path / f"coordinator-{len(started)}"),
            cluster_secrets=[secret],
            **settings,
        )
        app = build_coordinator_app(config, local)
        runner, port = await start_app(app, "127.0.0.1", 0, access_log)
        url = f"http://127.0.0.1:{port}"
        running = RunningCoordinator(url, app, runner, aiohttp.ClientSession(), [])
        started.append(running)
        for index in range(nodes):
            node_config = NodeConfig(
                model_repo=str(tmp_path / f"node-{len(started)}-{index}"),
                port=0,
                intra_op_threads=1,
                join=url,
                node_id=f"n{index}",
                cluster_secrets=[secret],
                **{
                    "heartbeat_interval_s": 0.2,
                    **(
                        node_settings[index]
                        if isinstance(node_settings, list)
                        else (node_settings or {})
                    ),
                },
            )
            node_app = build_node_app(node_config, local)
            node_runner, node_port = await start_app(node_app, "127.0.0.1", 0, access_log)
            node_url = f"http://127.0.0.1:{node_port}"
            if local is not None:
                join_local_peers(node_app, node_url, local)
            tasks.append(start_membership(node_app, node_url))
            running.nodes.append(
                RunningNode(node_url, node_app, node_runner, aiohttp.ClientSession())
            )
        await running.wait_members(nodes)
        return running

    yield start
    for task in tasks:
        task.cancel()
    for running in started:
        for node in running.nodes:
            await node.client.close()
            await node.runner.cleanup()
        await running.client.close()
        await running.runner.cleanup()
