"""Generation across a ring of real nodes (in process, port 0) on a tiny random-weight Llama:
the OpenAI client and Triton's generate routes, the greedy tokens of an in-process chain, seeded
sampling, stops, KV that is reserved and freed, and bad input answered with what is wrong."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from tests.conftest import RunningCoordinator, StartCoordinator
from tests.support.tiny_llm import shared_tiny_package
from tests.support.tiny_ring import MODEL, in_process_greedy, kv_reserved, start_tiny_ring


@pytest.fixture
async def ring(start_coordinator: StartCoordinator, tmp_path: Path) -> RunningCoordinator:
    return await start_tiny_ring(start_coordinator, tmp_path)


@pytest.fixture
async def client(ring: RunningCoordinator) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=ring.url + "/v1", api_key="none", max_retries=0) as c:
        yield c


async def test_greedy_through_two_spans_equals_the_in_process_chain_and_streams_the_same(
    ring: RunningCoordinator, client: openai.AsyncOpenAI
) -> None:
    prompt = "the quick brown fox"
    expected, text = in_process_greedy(prompt, 12)
    whole = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0
    )
    assert whole.choices[0].text == text.decode(expected)
    assert whole.usage is not None and whole.usage.prompt_tokens == len(text.encode(prompt))
    assert whole.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")
    pieces, finish, usage = [], None, None
    stream = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    async for event in stream:
        if event.choices:
            pieces.append(event.choices[0].text)
            finish = event.choices[0].finish_reason or finish
        usage = event.usage or usage
    assert "".join(pieces) == whole.choices[0].text and finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert await kv_reserved(ring) == [0, 0]  # freed on both spans after each request


async def test_chat_a_seeded_sample_repeats_and_stop_strings_end_it(
    ring: RunningCoordinator, client: openai.AsyncOpenAI
) -> None:
    messages: Any = [{"role": "user", "content": "hello there"}]
    runs = [
        await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=20, temperature=1.0, seed=seed
        )
        for seed in (7, 7, 8)
    ]
    texts = [r.choices[0].message.content for r in runs]
    assert texts[0] == texts[1] and runs[0].choices[0].message.role == "assistant"
    assert texts[0] != texts[2]  # another seed, another draw (20 tokens of a random model)
    full = texts[0] or ""
    assert len(full) > 4
    stop = full[2:4]
    stopped = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=1.0, seed=7, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[: full.index(stop)]
    chunks = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=1.0, seed=7, stream=True
    )
    streamed = [c async for c in chunks]
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full


async def test_triton_generate_and_generate_stream(ring: RunningCoordinator) -> None:
    body = {"text_input": "the quick brown fox", "parameters": {"max_tokens": 6, "temperature": 0}}
    async with ring.client.post(ring.url + f"/v2/models/{MODEL}/generate", json=body) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["model_name"] == MODEL and answer["model_version"] == "1"
    async with ring.client.post(ring.url + f"/v2/models/{MODEL}/generate_stream", json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in (await r.text()).split("\n\n") if line.startswith("data: ")]
    import json

    assert "".join(json.loads(e[6:])["text_output"] for e in events) == answer["text_output"]


async def test_a_client_gone_mid_stream_frees_its_kv_on_every_span(
    ring: RunningCoordinator,
) -> None:
    body = {"model": MODEL, "prompt": "a", "max_tokens": 1000, "stream": True, "ignore_eos": True}
    async with ring.client.post(ring.url + "/v1/completions", json=body) as r:
        await r.content.readline()  # the first event: the sequence holds KV on both spans
        assert max(await kv_reserved(ring)) > 0
    # the connection is closed here, mid-stream: the handler is cancelled, the close runs
    for _ in range(20):
        if await kv_reserved(ring) == [0, 0]:
            break
    assert await kv_reserved(ring) == [0, 0]


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens", "at least 1"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 1001}, "max_tokens", "max_tokens_limit"),
        ({"model": MODEL, "prompt": "x", "max_tokens": "9"}, "max_tokens", "an integer"),
        ({"model": MODEL, "prompt": 3}, "prompt", "a string"),
        ({"model": MODEL, "prompt": "x", "n": 2}, "n", "not supported"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"1": 5}}, "logit_bias", "not supported"),
        ({"model": MODEL, "prompt": "x", "temperature": -1}, "temperature", "temperature"),
        ({"model": MODEL, "prompt": "x", "colour": "red"}, "colour", "not a field"),
        ({"model": MODEL, "prompt": "x " * 700, "max_tokens": 8}, None, "context"),
        ({"model": "dense", "prompt": "x"}, None, "single-pass model"),
    ],
)
async def test_bad_completion_requests_are_400_naming_the_field(
    ring: RunningCoordinator, body: dict[str, Any], param: str | None, message: str
) -> None:
    async with ring.client.post(ring.url + "/v1/completions", json=body) as r:
        assert r.status == 400, await r.text()
        error = (await r.json())["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    async with ring.client.get(ring.url + "/v1/models") as r:  # still serving
        assert [m["id"] for m in (await r.json())["data"]] == [MODEL]


async def test_unknown_models_and_the_wrong_kind_of_route(
    ring: RunningCoordinator, client: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="tools"):
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )  # fmt: skip
    x = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 1], "data": [1]}]}
    async with ring.client.post(ring.url + f"/v2/models/{MODEL}/infer", json=x) as r:
        assert r.status == 400 and "generation model" in (await r.json())["error"]
    async with ring.client.post(
        ring.url + "/v2/models/dense/generate", json={"text_input": "x"}
    ) as r:
        assert r.status == 400 and "single-pass model" in (await r.json())["error"]


async def test_steps_replayed_or_sent_to_a_node_without_the_sequence_are_refused(
    ring: RunningCoordinator,
) -> None:
    from appliance.errors import UpstreamError
    from appliance.ring.sequences import OPEN, STEP, SequenceRef, call_chain
    from runtime.codec import encode_request
    from runtime.deadline import Deadline

    service = ring.service
    entry, placement = service.placed(MODEL)
    route = service.cluster.route(MODEL, entry.digest, len(entry.sizes), placement, 0.0)
    route = [type(s)(s.first, s.last, s.replicas[:1]) for s in route]
    post = service.clients.hop
    ref = SequenceRef(MODEL, entry.digest, "probe-1", "test")
    deadline = Deadline.after(30)
    await call_chain(post, OPEN, route, ref, deadline, b'{"reserve": 8}')
    body, length = encode_request({"input_ids": np.array([[5, 6, 7]], np.int64)})
    await call_chain(post, STEP, route, ref, deadline, body, 0, length)
    with pytest.raises(UpstreamError, match="expected position 3, got 0") as replayed:
        await call_chain(post, STEP, route, ref, deadline, body, 0, length)
    assert replayed.value.status == 409
    one, length1 = encode_request({"input_ids": np.array([[1]], np.int64)})
    await call_chain(post, STEP, route, ref, deadline, one, 3, length1)  # the KV was unchanged
    with pytest.raises(UpstreamError, match="unknown sequence 'probe-2'") as unknown:
        other = SequenceRef(MODEL, entry.digest, "probe-2", "test")
        await call_chain(post, STEP, route, other, deadline, one, 0, length1)
    assert unknown.value.status == 410


async def test_a_reservation_one_span_cannot_hold_is_503_and_the_others_release_theirs(
    start_coordinator: StartCoordinator, tmp_path: Path
) -> None:
    from appliance.ring.sequences import CLOSE, OPEN, SequenceRef, call_chain
    from runtime.deadline import Deadline

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / MODEL).symlink_to(shared_tiny_package() / MODEL)
    per_token = 2 * 2 * 2 * 16 * 4  # KV bytes per token of a 2-layer span of the tiny model
    ring = await start_coordinator(
        repo,
        nodes=2,
        # no queue on n1: a full budget answers 503 at once (tests/appliance/
        # test_generation_batching.py covers opens that queue, then proceed or time out)
        node_settings=[
            {"kv_budget_bytes": 10**6},
            {"kv_budget_bytes": 40 * per_token, "max_queued_sequences": 0},
        ],
    )
    service = ring.service
    placement = await service.load(MODEL, 2, 1)
    # one span each; which one is the links' call (both nodes are this host: a tie, to noise)
    assert sorted(s.replicas for s in placement.spans) == [("n0",), ("n1",)]
    entry = service.entry(MODEL)
    route = service.cluster.route(MODEL, entry.digest, 2, placement, 0.0)
    holder = SequenceRef(MODEL, entry.digest, "holder", "test")
    await call_chain(
        service.clients.hop, OPEN, route, holder, Deadline.after(30), b'{"reserve": 30}'
    )  # fmt: skip: 30 of n1's 40 tokens held
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 20}
    async with ring.client.post(ring.url + "/v1/completions", json=body) as r:
        assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
        assert "KV" in (await r.json())["error"]["message"]
    assert await kv_reserved(ring) == [30 * per_token, 30 * per_token]  # n0 released its own
    body["max_tokens"] = 5  # fits beside the holder: the ring still serves
    async with ring.client.post(ring.url + "/v1/completions", json=body) as r:
        assert r.status == 200
    body["max_tokens"] = 50  # more than n1 can ever hold: does not fit, not "retry later"
    async with ring.client.post(ring.url + "/v1/completions", json=body) as r:
        assert r.status == 507 and "Retry-After" not in r.headers
    await call_chain(service.clients.hop, CLOSE, route, holder, Deadline.after(30), b"{}")
    assert await kv_reserved(ring) == [0, 0]
