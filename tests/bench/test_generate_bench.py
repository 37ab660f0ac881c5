"""bench/generate.py's pieces that run without the real model: the SSE client of side (c)
against a real aiohttp server on port 0, the prompt builder with a tokenizer trained here, the
limit's IO-bound KV loop and last-position graph cut on a tiny decoder graph made here, and
the report on figures made up here. Nothing is timed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from aiohttp import web
from onnx import TensorProto, helper

from bench.generate_common import Round, build_prompt, common_prefix, prompt_text, summarise
from bench.generate_http import (
    EndpointFailed,
    EndpointMissing,
    SseParser,
    completion_payload,
    stream_completion,
)
from bench.generate_limit import LimitRunner, last_logits_variant
from bench.generate_report import summary, table
from bench.llama_cpp import _build_status

# --- side (c): the SSE client ---


def test_sse_parser_takes_any_split_crlf_comments_and_multiline_data() -> None:
    stream = (
        b": keep-alive\r\n\r\n"
        b'data: {"a": 1}\r\n\r\n'
        b"event: message\ndata: line one\ndata: line two\n\n"
        b"data:no-space\n\n"
        b"data: [DONE]\n\n"
    )
    want = ['{"a": 1}', "line one\nline two", "no-space", "[DONE]"]
    whole = SseParser()
    assert whole.feed(stream) == want
    bytewise = SseParser()
    got = [event for i in range(len(stream)) for event in bytewise.feed(stream[i : i + 1])]
    assert got == want
    tail = SseParser()
    assert tail.feed(b"data: unterminated") == []
    assert tail.close() == ["unterminated"]


def _chunk(text: str | None = None, finish: str | None = None, usage: Any = None) -> bytes:
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish}]
    body = {"id": "cmpl-1", "object": "text_completion", "model": "smollm2", "choices": choices}
    body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@pytest.fixture
async def completions_server() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """/v1/completions as the contract says, plus routes that break it in one way each."""
    seen: list[dict[str, Any]] = []

    async def good(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": warming up\n\n")
        pieces = ["Hello", ",", " wor", "ld", "!"]
        for k, text in enumerate(pieces):
            data = _chunk(text, "length" if k == len(pieces) - 1 else None)
            await response.write(data[:7])  # an event split inside its JSON
            await asyncio.sleep(0.005)
            await response.write(data[7:])
        usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
        await response.write(_chunk(usage=usage) + b"data: [DONE]\n\n")
        return response

    async def broken(request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        if kind == "status":
            return web.json_response({"error": {"message": "placement failed"}}, status=503)
        if kind == "json":
            return web.json_response({"choices": []})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_chunk("x"))
        if kind == "error":
            await response.write(b'data: {"error": {"message": "node lost"}}\n\n')
        elif kind == "no-usage":
            await response.write(b"data: [DONE]\n\n")
        # "no-done": the stream just ends
        return response

    app = web.Application()
    app.router.add_post("/good/v1/completions", good)
    app.router.add_post("/{kind}/v1/completions", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_stream_completion_reads_text_usage_and_first_token_time(
    completions_server: tuple[str, list[dict[str, Any]]],
) -> None:
    base, seen = completions_server
    async with aiohttp.ClientSession() as session:
        result = await stream_completion(session, base + "/good", "smollm2", "Hi there", 5)
    assert seen == [completion_payload("smollm2", "Hi there", 5)]
    assert seen[0]["stream"] is True and seen[0]["ignore_eos"] is True
    assert seen[0]["stream_options"] == {"include_usage": True}
    assert result.extra["text"] == "Hello, world!"
    assert result.count == 5 and result.extra["prompt_tokens"] == 7
    assert result.extra["finish_reason"] == "length"
    assert result.extra["chunks"] == 6  # five text chunks and the usage chunk
    assert result.ttft_s > 0 and result.decode_s > 0 and result.cpu_s is not None
    assert result.decode_tok_s == pytest.approx(4 / result.decode_s)


async def test_stream_completion_says_what_broke(
    completions_server: tuple[str, list[dict[str, Any]]],
) -> None:
    base, _ = completions_server
    async with aiohttp.ClientSession() as session:
        with pytest.raises(EndpointMissing, match="404"):
            await stream_completion(session, base + "/nowhere/else", "m", "p", 2)
        cases = {
            "status": "answered 503",
            "json": "not an event stream",
            "error": "node lost",
            "no-usage": "no usage chunk",
            "no-done": r"without data: \[DONE\]",
        }
        for kind, message in cases.items():
            with pytest.raises(EndpointFailed, match=message):
                await stream_completion(session, f"{base}/{kind}", "m", "p", 2)
    # nothing listening at all: a failure of the route, not a missing route
    async with aiohttp.ClientSession() as session:
        with pytest.raises(EndpointFailed, match="failed"):
            await stream_completion(session, "http://127.0.0.1:9", "m", "p", 2)


# --- the prompt builder ---


def _trained_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [
        "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
        "Generation benchmarks decode one token at a time, caching keys and values.",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def test_prompts_have_exactly_the_asked_token_counts() -> None:
    tokenizer = _trained_tokenizer()

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids))

    text = prompt_text()
    for n in (1, 7, 32, 100, 512):
        prompt, ids = build_prompt(encode, decode, text, n)
        assert len(ids) == n
        assert encode(prompt) == ids  # what a server tokenising the text gets
    with pytest.raises(ValueError):
        build_prompt(encode, decode, "   ", 4)


# --- side (a): the limit's loop on a tiny decoder graph ---

HEADS, DIM, VOCAB = 2, 4, 11


def _tiny_decoder(path: Path) -> Path:
    """optimum's interface (input_ids, attention_mask, position_ids, past_key_values.0.*
    -> logits, present.0.*), present = concat(past, new); every position's logits depend on
    the whole cache, so a wrong past shows in the tokens."""
    rng = np.random.default_rng(0)
    embed = rng.normal(size=(VOCAB, HEADS * DIM)).astype(np.float32)
    head = rng.normal(size=(HEADS * DIM, VOCAB)).astype(np.float32)
    past = [
        helper.make_tensor_value_info(
            f"past_key_values.0.{kind}", TensorProto.FLOAT, ["batch", HEADS, "past", DIM]
        )
        for kind in ("key", "value")
    ]
    present = [
        helper.make_tensor_value_info(
            f"present.0.{kind}", TensorProto.FLOAT, ["batch", HEADS, "total", DIM]
        )
        for kind in ("key", "value")
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["x"]),
        helper.make_node("Reshape", ["x", "split_shape"], ["x4"]),
        helper.make_node("Transpose", ["x4"], ["new"], perm=[0, 2, 1, 3]),
        helper.make_node("Neg", ["new"], ["new_value"]),
        helper.make_node("Concat", ["past_key_values.0.key", "new"], ["present.0.key"], axis=2),
        helper.make_node(
            "Concat", ["past_key_values.0.value", "new_value"], ["present.0.value"], axis=2
        ),
        helper.make_node("ReduceMean", ["present.0.key", "axis2"], ["pooled"], keepdims=1),
        helper.make_node("Transpose", ["pooled"], ["pooled_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["pooled_t", "flat_shape"], ["context"]),
        helper.make_node("Sin", ["x"], ["x_sin"]),
        helper.make_node("Add", ["x_sin", "context"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "head"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_decoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "all"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
            *past,
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB]),
            *present,
        ],
        [
            helper.make_tensor("embed", TensorProto.FLOAT, embed.shape, embed.ravel()),
            helper.make_tensor("head", TensorProto.FLOAT, head.shape, head.ravel()),
            helper.make_tensor("split_shape", TensorProto.INT64, [4], [0, 0, HEADS, DIM]),
            helper.make_tensor("flat_shape", TensorProto.INT64, [3], [0, 1, HEADS * DIM]),
            helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _plain_greedy(path: Path, prompt: list[int], new_tokens: int) -> tuple[list[int], Any]:
    """The loop without IO binding: presents fed back as the next pasts."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, HEADS, 0, DIM), np.float32)
    past = {"past_key_values.0.key": empty, "past_key_values.0.value": empty}
    ids, length, tokens, first = prompt, 0, [], None
    for _ in range(new_tokens):
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, length + len(ids)), np.int64),
            "position_ids": np.arange(length, length + len(ids), dtype=np.int64)[None, :],
            **past,
        }
        logits, key, value = session.run(["logits", "present.0.key", "present.0.value"], feeds)
        first = logits[0, -1] if first is None else first
        past = {"past_key_values.0.key": key, "past_key_values.0.value": value}
        length += len(ids)
        ids = [int(np.argmax(logits[0, -1]))]
        tokens.append(ids[0])
    return tokens, first


def test_limit_loop_matches_the_plain_loop_on_a_tiny_decoder(tmp_path: Path) -> None:
    source = _tiny_decoder(tmp_path / "model.onnx")
    variant = last_logits_variant(source, tmp_path / "model_last_logits.onnx")
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    want, first_logits = _plain_greedy(source, prompt, 12)
    runner = LimitRunner(variant, threads=1, capacity=len(prompt) + 12)
    result = runner.generate(prompt, 12)
    assert result.tokens == want
    assert len(set(want)) > 1  # the cache moves the answer: the check can fail
    runner.step(prompt, 0, 0)
    np.testing.assert_allclose(runner.last_logits(), first_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed"):
        runner.step(list(range(len(prompt) + 13)), 0, 0)
    with pytest.raises(ValueError, match="beside"):
        last_logits_variant(source, tmp_path / "elsewhere" / "x.onnx")


# --- figures, the report and small helpers ---


def _report() -> dict[str, Any]:
    def side(key: str, label: str, precision: str, tok_s: float, ttft_s: float) -> dict[str, Any]:
        rounds = [Round(ttft_s, 31 / tok_s, list(range(32))) for _ in range(3)]
        if key == "c":
            for r in rounds:
                r.cpu_s, r.extra["server_cpu_s"] = 0.1, 1.0
        return {
            "side": key,
            "label": label,
            "precision": precision,
            "settings": {},
            "skipped": None,
            "results": {"32": summarise(rounds)},
        }

    sides = {
        "limit": side("a", "(a) limit", "fp32", 40.0, 0.05),
        "runtime-1span-fp32": side("b", "(b) runtime, 1 span", "fp32", 32.0, 0.06),
        "runtime-3span-fp32": side("b", "(b) runtime, 3 spans", "fp32", 30.0, 0.07),
        "serve-1node-fp32": side("c", "(c) serve, 1 node", "fp32", 25.0, 0.1),
        "serve-3node-fp32": side("c", "(c) serve, 3 nodes", "fp32", 20.0, 0.2),
        "pytorch": side("d", "(d) PyTorch", "fp32", 16.0, 0.09),
    }
    sides["llama.cpp"] = {**side("e", "(e) llama.cpp", "Q4_1", 90.0, 0.02), "skipped": "no venv"}
    machine = {"loadavg": [0.1, 0.1, 0.1], "busy_processes": []}
    return {
        "settings": {"new_tokens": 32, "threads": 2, "rounds": 3},
        "machine": {"cpus": 2, "before": machine, "after": machine},
        "prompts": [{"tokens": 32, "text": "..."}],
        "sides": sides,
    }


def test_summary_and_table_put_the_sides_side_by_side() -> None:
    tokens = {"limit": {32: [1, 2, 3, 4]}, "pytorch": {32: [1, 2, 9, 9]}}
    report = _report()
    report["summary"] = summary(report, tokens)
    costs = report["summary"]["span_cost_ms_per_token"]["prompt_32"]
    one, three = 1000 / 32, 1000 / 30
    assert costs["runtime_fp32_3_vs_1_spans"]["decode_ms"] == pytest.approx(
        (three - one) / 2, abs=0.01
    )
    assert costs["serve_fp32"]["mean_1_to_3"] == pytest.approx((50 - 40) / 2, abs=0.01)
    ratios = report["summary"]["ratios"]["prompt_32"]
    assert ratios["serve-3node-fp32_over_limit"]["decode"] == pytest.approx(0.5)
    assert ratios["runtime-1span-fp32_over_pytorch"]["decode"] == pytest.approx(2.0)
    assert report["summary"]["agreement"]["prompt_32"] == {"limit": "4/4", "pytorch": "2/4"}
    load = report["summary"]["load_generator"]["prompt_32"]["serve-1node-fp32"]
    assert load["client_cpu_pct_of_one_core"] > 0
    text = table(report)
    assert "(c) serve, 3 nodes" in text and "0.50x" in text
    assert "skipped (e) llama.cpp Q4_1: no venv" in text
    assert "one sequence at a time" in text


def test_round_figures_and_helpers() -> None:
    r = Round(0.1, 2.0, list(range(41)))
    assert r.count == 41 and r.decode_tok_s == pytest.approx(20.0)
    assert Round(0.1, 0.0, [7]).decode_tok_s == 0.0
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert _build_status("  [39/193] /usr/bin/g++ -o a/b/unity_2_cxx.cxx.o -c x.cxx") == (
        "[ 20%] unity_2_cxx.cxx.o"
    )
    assert _build_status("random noise") is None


def test_a_full_faults_document_keeps_the_sections_other_benches_wrote() -> None:
    from bench.report import other_sections

    old = "# R\n\nintro\n\n## A\n\nold a\n\n## Test hosts\n\nh1\nh2\n\n## B\nb\n"
    new = "# R\n\n## A\n\nnew a\n\n## B\nb2\n"
    assert other_sections(old, new) == ["\n## Test hosts\n\nh1\nh2\n"]
    assert other_sections(new, new) == []
