"""Generation answered other ways than a live stream, on the tiny Llama over two in-process
nodes: greedy repeats from the result cache (and Cache-Control to bypass it), token ids as vLLM
returns them, durable jobs (``Prefer: respond-async``) polled, fetched and cancelled."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import RunningCoordinator, StartCoordinator
from tests.support.tiny_ring import (
    MODEL,
    in_process_greedy,
    kv_reserved,
    node_load,
    start_tiny_ring,
)

ASYNC = {"Prefer": "respond-async"}


@pytest.fixture
async def ring(start_coordinator: StartCoordinator, tmp_path: Path) -> RunningCoordinator:
    return await start_tiny_ring(start_coordinator, tmp_path)


async def complete(
    ring: RunningCoordinator, body: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    async with ring.client.post(ring.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def computed(ring: RunningCoordinator) -> int:
    """Tokens every span ran so far, from the nodes' heartbeats."""
    return sum(await node_load(ring, "tokens_computed"))


async def cache_hits(ring: RunningCoordinator) -> float:
    async with ring.client.get(ring.url + "/metrics") as r:
        text = await r.text()
    hits = [
        line for line in text.splitlines() if line.startswith("appliance_generation_cache_total")
    ]
    return sum(float(h.rsplit(" ", 1)[1]) for h in hits if 'outcome="hit"' in h)


async def test_a_greedy_repeat_is_answered_from_the_cache_unless_the_client_says_no_cache(
    ring: RunningCoordinator,
) -> None:
    prompt = "the quick brown fox"
    expected, _ = in_process_greedy(prompt, 8)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "return_token_ids": True}  # fmt: skip
    before = await computed(ring)
    first = await complete(ring, body)
    assert first["choices"][0]["token_ids"] == expected  # vLLM's return_token_ids
    # the cache keeps what is asked again (cache_admit_after = 2): the second run is stored
    second = await complete(ring, body)
    assert second["choices"][0] == first["choices"][0]
    after_first = await computed(ring)
    assert after_first > before
    again = await complete(ring, body)
    assert again["choices"][0] == first["choices"][0] and again["usage"] == first["usage"]
    assert await computed(ring) == after_first  # no node ran a step for the repeat
    assert await cache_hits(ring) == 1
    bypassed = await complete(ring, body, {"Cache-Control": "no-cache"})
    assert bypassed["choices"][0]["token_ids"] == expected
    after_bypass = await computed(ring)
    assert after_bypass > after_first
    # a stream of the same request: from the cache too, its chunks' token ids the same tokens
    async with ring.client.post(ring.url + "/v1/completions", json={**body, "stream": True}) as r:
        events = [e for e in (await r.text()).split("\n\n") if e.startswith("data: {")]
    assert [t for e in events for t in orjson.loads(e[6:])["choices"][0]["token_ids"]] == expected
    assert await computed(ring) == after_bypass and await cache_hits(ring) == 2
    # sampling is never cached: each request runs, a seed repeats the draw
    sampled = {**body, "temperature": 1.0, "seed": 7}
    runs = [await complete(ring, sampled) for _ in range(2)]
    assert runs[0]["choices"][0]["token_ids"] == runs[1]["choices"][0]["token_ids"]
    assert await computed(ring) > after_bypass and await cache_hits(ring) == 2


async def wait_job(
    ring: RunningCoordinator, location: str, timeout_s: float = 60
) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        async with ring.client.get(ring.url + location) as r:
            job = dict(await r.json())
        if job["status"] not in ("queued", "running"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {location} still {job['status']} after {timeout_s}s")


async def test_generation_routes_answer_async_jobs_polled_and_fetched(
    ring: RunningCoordinator,
) -> None:
    body = {"model": MODEL, "prompt": "a robot learns", "max_tokens": 10, "temperature": 0}
    sync = await complete(ring, body, {"Cache-Control": "no-cache"})
    async with ring.client.post(ring.url + "/v1/completions", json=body, headers=ASYNC) as r:
        assert r.status == 202 and r.headers["Preference-Applied"] == "respond-async"
        location = r.headers["Location"]
        assert (await r.json())["kind"] == "completions"
    job = await wait_job(ring, location)
    assert job["status"] == "succeeded", job
    assert job["result"]["choices"][0]["text"] == sync["choices"][0]["text"]
    async with ring.client.get(ring.url + location + "/result") as r:
        assert r.status == 200
        assert (await r.json())["choices"] == job["result"]["choices"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with ring.client.post(ring.url + "/v1/chat/completions", json=chat, headers=ASYNC) as r:
        assert r.status == 202
        job = await wait_job(ring, r.headers["Location"])
    assert job["kind"] == "chat_completions" and job["result"]["object"] == "chat.completion"
    triton = {"text_input": "a robot learns", "parameters": {"max_tokens": 10, "temperature": 0}}
    url = ring.url + f"/v2/models/{MODEL}/generate"
    async with ring.client.post(url, json=triton, headers=ASYNC) as r:
        assert r.status == 202
        job = await wait_job(ring, r.headers["Location"])
    assert job["kind"] == "generate"
    assert job["result"]["text_output"] == sync["choices"][0]["text"]
    # refused at once, as the sync call would be: a stream, a bad field, an unknown model
    for bad, status, words in [
        ({**body, "stream": True}, 400, "streamed request cannot be asynchronous"),
        ({**body, "max_tokens": -3}, 400, "max_tokens"),
        ({**body, "model": "nope"}, 404, "nope"),
    ]:
        async with ring.client.post(ring.url + "/v1/completions", json=bad, headers=ASYNC) as r:
            assert r.status == status and words in await r.text()


async def test_deleting_a_running_generation_job_frees_its_kv_on_every_span(
    ring: RunningCoordinator,
) -> None:
    body = {"model": MODEL, "prompt": "a", "max_tokens": 900, "ignore_eos": True}
    async with ring.client.post(ring.url + "/v1/completions", json=body, headers=ASYNC) as r:
        location = r.headers["Location"]
    for _ in range(40):
        if min(await kv_reserved(ring)) > 0:
            break
    assert min(await kv_reserved(ring)) > 0  # running: both spans hold its KV
    async with ring.client.delete(ring.url + location) as r:
        assert r.status == 200 and (await r.json())["status"] == "cancelled"
    assert await kv_reserved(ring) == [0, 0]  # within one heartbeat after the answer
    stopped = await computed(ring)
    await asyncio.sleep(0.5)
    assert await computed(ring) == stopped  # no step ran for it after
