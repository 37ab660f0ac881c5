"""A burst of sequences spreads over every span's replicas: the tiny Llama in 2 spans x 2
replicas on four in-process nodes, eight streams asked at once. A sequence counts on its chain's
nodes from the moment the chain is pinned, so the burst's later sequences see the earlier ones
(counted on the first span only, once an open was answered, every sequence of the burst saw the
same loads and took one chain)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.conftest import StartCoordinator
from tests.support.tiny_llm import shared_tiny_package
from tests.support.tiny_ring import MODEL

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
STREAMS, TOKENS = 8, 12


async def test_a_burst_of_streams_is_spread_over_the_replicas(
    start_coordinator: StartCoordinator, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / MODEL).symlink_to(shared_tiny_package() / MODEL)
    ring = await start_coordinator(repo, nodes=4, max_tokens_limit=1000)
    await ring.service.load(MODEL, 2, 2)

    async def stream(i: int) -> int:
        body = {"model": MODEL, "prompt": f"word {i}", "max_tokens": TOKENS, "ignore_eos": True,
                "temperature": 0, "stream": True}  # fmt: skip
        chunks = 0
        async with ring.client.post(ring.url + "/v1/completions", json=body, headers=NO_CACHE) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                chunks += line.startswith(b"data: {")
        return chunks

    assert await asyncio.gather(*(stream(i) for i in range(STREAMS))) == [TOKENS] * STREAMS
    await asyncio.sleep(0.6)  # heartbeats every 0.2 s
    generated = [
        sum(int(span.get("generated_tokens", 0)) for span in m.load.get("decoder_spans") or [])
        for m in ring.service.cluster.members.values()
    ]
    assert len(generated) == 4, generated
    # each span's replica runs at least a quarter of the burst's steps (all of them on one node
    # of each span before; about a half each when spread)
    assert min(generated) >= STREAMS * TOKENS // 4, generated
    assert ring.service.sequences_on and set(ring.service.sequences_on.values()) == {0}
