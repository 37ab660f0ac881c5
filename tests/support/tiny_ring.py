"""A ring of in-process nodes serving the tiny random-weight Llama (two spans) and a small
single-pass model, and what generation tests compare it with: the in-process chain's greedy
tokens and the KV each node reports."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from exporter.decoder_verify import greedy, load_chain
from runtime.package import open_package
from runtime.session import SessionSettings
from runtime.text import PackageText
from tests.conftest import RunningCoordinator, StartCoordinator
from tests.models import dense_model, put_model
from tests.support.tiny_llm import shared_tiny_package

MODEL = "tiny-llm"


async def start_tiny_ring(
    start_coordinator: StartCoordinator, tmp_path: Path, **settings: Any
) -> RunningCoordinator:
    """Two nodes, each holding one span of the tiny Llama; "dense" on one of them."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / MODEL).symlink_to(shared_tiny_package() / MODEL)  # read-only, exported once
    put_model(repo, "dense", dense_model())
    running = await start_coordinator(repo, nodes=2, max_tokens_limit=1000, **settings)
    await running.service.load(MODEL, 2, 1)
    await running.service.load("dense", 1, 1)
    return running


def in_process_greedy(prompt: str, tokens: int) -> tuple[list[int], PackageText]:
    package = open_package(shared_tiny_package(), MODEL)
    assert package.manifest is not None and package.manifest.generation is not None
    info = package.manifest.generation
    text = PackageText.open(package.folder, info.tokenizer, info.chat_template,
                            info.bos_token_id, info.eos_token_ids)  # fmt: skip
    chain = load_chain(package, package.manifest.default_stages, SessionSettings(device="cpu"))
    return greedy(chain, text.encode(prompt), tokens, list(info.eos_token_ids)), text


async def kv_reserved(ring: RunningCoordinator) -> list[int]:
    """Every node's reserved KV bytes, as its latest heartbeat reports them."""
    await asyncio.sleep(0.5)  # heartbeats every 0.2 s
    return [int(m.load.get("kv_reserved_bytes", -1)) for m in ring.service.cluster.members.values()]


async def node_load(ring: RunningCoordinator, key: str) -> list[int]:
    """A figure every node's latest heartbeat reports (``tokens_computed``, ``sequences``)."""
    await asyncio.sleep(0.5)
    return [int(m.load.get(key, -1)) for m in ring.service.cluster.members.values()]
