"""Prefix reuse through the coordinator, on the tiny Llama in 2 spans x 2 replicas (four
in-process nodes): requests sharing a long system prompt with different user turns (result cache
bypassed) are routed to the replicas holding it, compute only their new tokens (the nodes'
prefill counts drop by the shared blocks), say so in usage, and answer as without reuse."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.conftest import RunningCoordinator, StartCoordinator
from tests.support.tiny_llm import shared_tiny_package
from tests.support.tiny_ring import MODEL, in_process_greedy

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
SYSTEM = " ".join(["The lighthouse keeper writes the weather in a book every night."] * 14)


async def prefill_tokens(ring: RunningCoordinator) -> int:
    """Prompt tokens every span of every node has run, from their heartbeats."""
    await asyncio.sleep(0.6)  # a heartbeat (0.2 s) after the last request
    return sum(
        int(span.get("prefill_tokens", 0))
        for member in ring.service.cluster.members.values()
        for span in member.load.get("decoder_spans") or []
    )


async def complete(ring: RunningCoordinator, prompt: str) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0,
            "return_token_ids": True}  # fmt: skip
    async with ring.client.post(ring.url + "/v1/completions", json=body, headers=NO_CACHE) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def test_a_shared_system_prompt_is_computed_once_and_routed_to(
    start_coordinator: StartCoordinator, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / MODEL).symlink_to(shared_tiny_package() / MODEL)
    ring = await start_coordinator(repo, nodes=4, max_tokens_limit=1000)
    await ring.service.load(MODEL, 2, 2)
    turns = ["What is the weather?", "Who keeps the book?", "When does he write?",
             "Where is the lighthouse?", "Why every night?"]  # fmt: skip
    expected, text = in_process_greedy(f"{SYSTEM}\n{turns[0]}", 6)
    shared = len(text.encode(SYSTEM))
    assert shared >= 400, shared
    before = await prefill_tokens(ring)
    first = await complete(ring, f"{SYSTEM}\n{turns[0]}")
    assert first["choices"][0]["token_ids"] == expected
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    prompt_tokens = first["usage"]["prompt_tokens"]
    after_first = await prefill_tokens(ring)
    assert after_first - before == 2 * prompt_tokens  # both spans ran the whole prompt
    block_aligned = shared // 32 * 32 - 32  # the blocks wholly inside the system prompt, at least
    # the first span's replica holding the prefix is made the busier one: least-loaded
    # routing alone would now send the next requests to the other, which holds nothing
    holder = [
        m.address
        for m in ring.service.cluster.members.values()
        for span in m.load.get("decoder_spans") or []
        if span["first"] == 0 and span.get("prefix_blocks")
    ]
    assert len(holder) == 1, holder
    ring.service.sequences_on[holder[0]] = ring.service.sequences_on.get(holder[0], 0) + 10
    for turn in turns[1:]:
        start = await prefill_tokens(ring)
        answer = await complete(ring, f"{SYSTEM}\n{turn}")
        cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= block_aligned, (turn, cached)
        computed = await prefill_tokens(ring) - start
        assert computed <= 2 * (answer["usage"]["prompt_tokens"] - block_aligned), computed
        want, _ = in_process_greedy(f"{SYSTEM}\n{turn}", 6)
        assert answer["choices"][0]["token_ids"] == want  # the same answer as without reuse
