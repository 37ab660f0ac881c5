"""Continuous batching and prefix reuse on real nodes (in process, port 0) serving the tiny
Llama in two spans: concurrent streams answer the in-process greedy tokens in shared decode
batches, opens past max_sequences queue then proceed (or 503), and an open carrying the
prompt's ids starts from the chain's cached prefix: fewer prompt tokens computed, same tokens."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import numpy as np
import openai
import orjson
import pytest

from appliance.errors import UpstreamError
from appliance.ring.sequences import CLOSE, OPEN, STEP, SequenceRef, call_chain, call_group
from runtime.codec import encode_request
from runtime.deadline import Deadline
from tests.conftest import RunningCoordinator, StartCoordinator
from tests.support.tiny_ring import MODEL, in_process_greedy, start_tiny_ring

PREFIX = np.random.default_rng(4).integers(3, 300, size=400).tolist()


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples on a /metrics page."""
    pattern = re.compile(rf"^{name}(?:{{[^}}]*}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


async def node_metrics(ring: RunningCoordinator) -> list[str]:
    pages = []
    for node in ring.nodes:
        async with node.client.get(node.url + "/metrics") as r:
            assert r.status == 200
            pages.append(await r.text())
    return pages


class Chain:
    """The node sequence API along one replica chain, driven as a coordinator would."""

    def __init__(self, ring: RunningCoordinator) -> None:
        service = ring.service
        entry, placement = service.placed(MODEL)
        route = service.cluster.route(MODEL, entry.digest, len(entry.sizes), placement, 0.0)
        self.route = [type(s)(s.first, s.last, s.replicas[:1]) for s in route]
        self.post, self.digest = service.clients.hop, entry.digest

    def ref(self, name: str) -> SequenceRef:
        return SequenceRef(MODEL, self.digest, name, "test")

    async def open(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        raw = await call_chain(self.post, OPEN, self.route, self.ref(name), Deadline.after(30),
                               orjson.dumps(body))  # fmt: skip
        answer: dict[str, Any] = orjson.loads(raw)
        return answer

    async def step(self, name: str, position: int, ids: list[int]) -> int:
        body, length = encode_request({"input_ids": np.array([ids], np.int64)})
        raw = await call_chain(self.post, STEP, self.route, self.ref(name), Deadline.after(30),
                               body, position, length)  # fmt: skip
        token: int = orjson.loads(raw)["token"]
        return token

    async def close(self, name: str) -> None:
        await call_chain(self.post, CLOSE, self.route, self.ref(name), Deadline.after(30), b"{}")

    async def generate(
        self, name: str, prompt: list[int], new: int, prefix: bool
    ) -> tuple[int, list[int]]:
        body: dict[str, Any] = {"reserve": len(prompt) + new, "sampling": {"temperature": 0}}
        if prefix:
            body["prefix_ids"] = prompt
        cached = int((await self.open(name, body))["cached_tokens"])
        tokens = [await self.step(name, cached, prompt[cached:])]
        while len(tokens) < new:
            tokens.append(await self.step(name, len(prompt) + len(tokens) - 1, [tokens[-1]]))
        await self.close(name)
        return cached, tokens


async def test_concurrent_streams_share_decode_batches_and_answer_the_greedy_tokens(
    start_coordinator: StartCoordinator, tmp_path: Path
) -> None:
    ring = await start_tiny_ring(start_coordinator, tmp_path)
    prompts = [f"the quick brown fox {'jumps ' * i}over" for i in range(8)]
    async with openai.AsyncOpenAI(base_url=ring.url + "/v1", api_key="none", max_retries=0) as c:
        answers = await asyncio.gather(*(
            c.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
            for p in prompts
        ))  # fmt: skip
    for prompt, answer in zip(prompts, answers, strict=True):
        expected, text = in_process_greedy(prompt, 12)
        assert answer.choices[0].text == text.decode(expected)
    for page in await node_metrics(ring):
        rows = metric(page, "appliance_decode_batch_rows_sum")
        runs = metric(page, "appliance_decode_batch_rows_count")
        assert runs > 0 and rows / runs > 1.5, (rows, runs)  # decode steps ran together
        assert metric(page, "appliance_generated_tokens_total") == rows
    groups = ring.service.step_groups  # and travelled together: one call per chain and turn
    assert groups.calls > 0 and groups.rows / groups.calls > 1.5, (groups.rows, groups.calls)
    async with ring.nodes[0].client.get(ring.url + "/metrics") as r:
        page = await r.text()
    steps = metric(page, "appliance_generation_step_rows_sum")  # the decode steps, every one
    calls = metric(page, "appliance_generation_step_rows_count")
    assert steps == len(prompts) * 11 and calls < steps, (steps, calls)


async def test_a_grouped_step_answers_each_row_on_its_own(
    start_coordinator: StartCoordinator, tmp_path: Path
) -> None:
    """Rows of one STEPS call along both spans: a sequence this chain does not hold and one
    at a wrong position fail alone (410, 409), the others get the tokens of their own calls."""
    ring = await start_tiny_ring(start_coordinator, tmp_path)
    chain = Chain(ring)
    prompts = [[5, 6, 7], [40, 41, 42, 43], [9, 9]]
    tokens = []
    for i, p in enumerate(prompts):
        await chain.open(f"g{i}", {"reserve": len(p) + 4, "sampling": {"temperature": 0}})
        tokens.append(await chain.step(f"g{i}", 0, p))
    names = ["g0", "nobody", "g1", "g2"]
    positions = [3, 0, 4, 7]  # g2 is at 2
    fed = [tokens[0], 1, tokens[1], tokens[2]]
    body, length = encode_request({"input_ids": np.array([[t] for t in fed], np.int64)})
    results = await call_group(chain.post, chain.route, MODEL, chain.digest, names, positions,
                               Deadline.after(30), body, length)  # fmt: skip
    assert [r.get("status") for r in results] == [None, 410, None, 409], results
    assert "unknown sequence 'nobody'" in str(results[1]["error"])
    # the same steps one by one, on sequences fed alike, give the same tokens
    for i, p in enumerate(prompts[:2]):
        await chain.open(f"s{i}", {"reserve": len(p) + 4, "sampling": {"temperature": 0}})
        assert await chain.step(f"s{i}", 0, p) == tokens[i]
    assert results[0]["token"] == await chain.step("s0", 3, [tokens[0]])
    assert results[2]["token"] == await chain.step("s1", 4, [tokens[1]])
    with pytest.raises(UpstreamError, match="one row of input_ids") as bad:
        await call_group(chain.post, chain.route, MODEL, chain.digest, ["g0", "g1"], [4],
                         Deadline.after(30), body, length)  # fmt: skip
    assert bad.value.status == 400
    for name in ["g0", "g1", "g2", "s0", "s1"]:
        await chain.close(name)


async def test_opens_past_max_sequences_wait_for_a_close_and_a_full_queue_is_503(
    start_coordinator: StartCoordinator, tmp_path: Path
) -> None:
    ring = await start_tiny_ring(
        start_coordinator, tmp_path, node_settings={"max_sequences": 1, "max_queued_sequences": 1}
    )
    chain = Chain(ring)
    body = {"reserve": 8}
    await chain.open("a", body)
    second = asyncio.create_task(chain.open("b", body))
    await asyncio.sleep(0.3)
    assert not second.done()
    with pytest.raises(UpstreamError, match="max_queued_sequences 1") as full:
        await chain.open("c", body)
    assert full.value.status == 503
    # b waits on the first span's node (whichever node placement gave it), nowhere else
    queued = [metric(page, "appliance_sequences_queued") for page in await node_metrics(ring)]
    assert sorted(queued) == [0, 1], queued
    await chain.close("a")
    assert (await asyncio.wait_for(second, 5))["opened"] is True
    assert await chain.step("b", 0, [5, 6, 7]) >= 0
    await chain.close("b")


async def test_a_shared_400_token_prefix_is_computed_once_along_the_chain(
    start_coordinator: StartCoordinator, tmp_path: Path
) -> None:
    ring = await start_tiny_ring(start_coordinator, tmp_path)
    chain = Chain(ring)
    tails = [[9, 8, 7, 6, 5], [40, 41, 42], [100, 101, 102, 103]]
    plain = [await chain.generate(f"p{i}", PREFIX + t, 6, False) for i, t in enumerate(tails)]
    before = [metric(p, "appliance_prefill_tokens_total") for p in await node_metrics(ring)]
    reused = [await chain.generate(f"r{i}", PREFIX + t, 6, True) for i, t in enumerate(tails)]
    after = [metric(p, "appliance_prefill_tokens_total") for p in await node_metrics(ring)]
    aligned = len(PREFIX) // 32 * 32
    assert [c for c, _ in reused] == [0, aligned, aligned]  # the min over both spans
    assert [t for _, t in reused] == [t for _, t in plain]
    for node_before, node_after in zip(before, after, strict=True):
        computed_reused = node_after - node_before
        assert node_before - computed_reused >= 2 * aligned  # per node, the prefix is not redone
    pages = await node_metrics(ring)
    assert [metric(p, "appliance_prefix_hits_total") for p in pages] == [2, 2]
    await asyncio.sleep(0.5)  # heartbeats every 0.2 s carry the newest block names
    for member in ring.service.cluster.members.values():
        (span,) = member.load["decoder_spans"]
        assert span["prefix_block_tokens"] == 32 and len(span["prefix_blocks"]) >= aligned // 32
        assert member.load["kv_reserved_bytes"] == 0 and member.load["kv_cached_bytes"] > 0
    with pytest.raises(UpstreamError, match="prefix_ids must be") as bad:
        await chain.open("bad", {"reserve": 8, "prefix_ids": [1, "x"]})
    assert bad.value.status == 400


async def test_steps_of_one_turn_leave_in_calls_of_at_most_64_rows(
    start_coordinator: StartCoordinator, tmp_path: Path
) -> None:
    """70 sequences of one chain step in one turn: two STEPS calls (64 + 6 rows, the ids travel
    in a header), each sequence answered its own greedy token, as a step of its own gives."""
    from appliance.coordinator.generation.step_groups import MAX_GROUP_ROWS

    ring = await start_tiny_ring(start_coordinator, tmp_path, node_settings={"max_sequences": 80})
    chain, groups = Chain(ring), ring.service.step_groups
    firsts = []
    for i in range(70):
        await chain.open(f"q{i}", {"reserve": 8, "sampling": {"temperature": 0}})
        firsts.append(await chain.step(f"q{i}", 0, [5, 6, 7 + i % 3]))
    calls, rows = groups.calls, groups.rows
    futures = [groups.step(chain.route, chain.ref(f"q{i}"), Deadline.after(30), 3, firsts[i])
               for i in range(70)]  # fmt: skip
    answers = await asyncio.gather(*futures)
    assert (groups.calls - calls, groups.rows - rows) == (2, 70) and MAX_GROUP_ROWS == 64
    for k in range(3):  # sequences alike up to here answer alike, grouped or alone
        await chain.open(f"alone{k}", {"reserve": 8, "sampling": {"temperature": 0}})
        assert await chain.step(f"alone{k}", 0, [5, 6, 7 + k]) == firsts[k]
        assert await chain.step(f"alone{k}", 3, [firsts[k]]) == answers[k]["token"]
    assert all(a["token"] == answers[i % 3]["token"] for i, a in enumerate(answers))
    for name in [f"q{i}" for i in range(70)] + [f"alone{k}" for k in range(3)]:
        await chain.close(name)
