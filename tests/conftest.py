"""Shared fixtures: a real node server on port 0 over a repository of tiny models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from appliance.config import NodeConfig
from appliance.node_server import REGISTRY, build_node_app, start_app


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
