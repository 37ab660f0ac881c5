"""SmolLM2-135M-Instruct through three real node processes (``appliance serve --nodes 3
--stages 3``): the committed prompt set's greedy answers equal PyTorch's greedy tokens on the
same weights (up to fp32 near-ties, counted) and the in-process chain's, streamed text equals the
whole answer, a seeded sampled run repeats, and the OpenAI client works unmodified."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest

from exporter.decoder_verify import DecoderChain, greedy, load_prompts
from runtime.decoder_load import load_decoder_span
from runtime.package import open_package
from runtime.session import SessionSettings
from runtime.text import PackageText
from tests.support.smollm2 import NAME, smollm2_export, smollm2_repo

pytestmark = pytest.mark.slow
TOKENS = 40  # PyTorch's reference answers are this long (EOS ignored)
NEAR_TIE = 2e-3  # a top-1/top-2 logit gap below this may flip with fp32 noise


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("serve")
    repo = work / "repo"
    repo.mkdir()
    (repo / NAME).symlink_to(smollm2_repo() / NAME)
    log = open(work / "serve.log", "w")  # noqa: SIM115 - the process owns it
    process = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "serve", "--nodes", "3", "--stages", "3",
         "--port", "0", "--model-repo", str(repo), "--state-dir", str(work / "state")],
        stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ},
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"http://\S+", line)
    if not match:
        process.kill()
        raise AssertionError(f"serve did not come up: {(work / 'serve.log').read_text()}")
    assert "smollm2: segments 0-" in line and line.count(" on local-") == 3, line
    try:
        yield match.group(0)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        log.close()


@pytest.fixture(scope="module")
def client(served: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=served + "/v1", api_key="none", max_retries=0)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def test_greedy_answers_equal_pytorch_and_the_in_process_chain(client: openai.OpenAI) -> None:
    export = smollm2_export()
    assert export.folder is not None and export.generation is not None
    info = export.generation
    text = PackageText.open(export.folder, info.tokenizer, info.chat_template,
                            info.bos_token_id, info.eos_token_ids)  # fmt: skip
    package = open_package(smollm2_repo(), NAME)
    settings = SessionSettings(device="cpu", intra_op_threads=2)
    chain = DecoderChain(
        [load_decoder_span(package, settings, a, b) for a, b in export.default_stages]
    )
    near_ties = 0
    prompts: list[Any] = load_prompts()
    for messages, reference in zip(prompts, export.references, strict=True):
        prompt = text.encode(text.render_chat(messages))
        assert prompt == reference.prompt_ids  # the coordinator renders as transformers does
        ours = greedy(chain, prompt, TOKENS, [])  # EOS ignored, as PyTorch's reference
        split = first_difference(ours, reference.tokens)
        if split is not None:  # allowed only where PyTorch itself was nearly undecided
            top2 = np.sort(reference.logits[split])[-2:]
            assert top2[1] - top2[0] < NEAR_TIE, (split, top2)
            near_ties += 1
        answer = client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=TOKENS, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert answer.choices[0].message.content == text.decode(ours)  # served = in process
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage is not None and answer.usage.completion_tokens == TOKENS
    print(f"{near_ties} of {len(export.references)} answers reached a near-tie")


def test_paris_streamed_equals_whole_and_a_seeded_run_repeats(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=24, temperature=0
    )
    content = whole.choices[0].message.content or ""
    assert "Paris" in content and whole.choices[0].finish_reason == "stop"
    stream: Any = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == content
    sampled = [
        client.completions.create(
            model=NAME, prompt="Once upon a time", max_tokens=24, temperature=0.9, top_p=0.95,
            seed=11,
        ).choices[0].text
        for _ in range(2)
    ]  # fmt: skip
    assert sampled[0] == sampled[1] and len(sampled[0]) > 10
    stopped = client.completions.create(
        model=NAME, prompt="Once upon a time", max_tokens=24, temperature=0.9, top_p=0.95,
        seed=11, stop=[sampled[0][5:8]],
    )  # fmt: skip
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == sampled[0][: sampled[0].index(sampled[0][5:8])]


def test_one_stream_on_three_local_nodes_runs_on_their_alone_sessions(
    served: str, client: openai.OpenAI
) -> None:
    """serve shares 2 cores among 3 nodes (1 thread each) and gives each node alone sessions
    with the cores: a lone stream's steps, which hold every open sequence, run on them."""
    import json
    import urllib.request

    def alone_runs() -> list[float]:
        with urllib.request.urlopen(served + "/v2/cluster", timeout=10) as response:
            nodes = json.loads(response.read())["nodes"]
        counts = []
        for node in nodes:
            with urllib.request.urlopen(node["address"] + "/metrics", timeout=10) as response:
                text = response.read().decode()
            found = re.findall(r"^appliance_alone_session_runs_total\{[^}]*\} (\S+)$", text, re.M)
            counts.append(sum(float(x) for x in found))
        return counts

    before = alone_runs()
    assert len(before) == 3
    client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8,
                              temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    after = alone_runs()
    # each node: the prompt's chunk and 7 or 8 decode steps (the first token comes from the
    # prompt's run); on one core each node has it already (no alone sessions)
    if (os.cpu_count() or 1) < 2:
        assert after == before
    else:
        assert all(a - b >= 8 for a, b in zip(after, before, strict=True)), (before, after)
