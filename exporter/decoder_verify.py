"""Verify a generation package against the PyTorch model, through ``runtime.decoder`` (what is
verified is what nodes serve: the package's default stages, each loaded as one DecoderSpan).

PyTorch greedy-answers each prompt of ``data/generation_prompts.json`` (its own KV cache, one
token a step), keeping the logits of every step. The chained spans are then teacher-forced with
the same tokens (prefill the prompt, one token a step): at every step each logit must be within
``atol`` of PyTorch's, and the argmax must agree wherever PyTorch's top-1/top-2 gap is at least
``tie_gap`` (closer steps are counted as near-ties). A left-padded batch of two prompts of
different lengths must match each prompt's own PyTorch logits the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import DecoderVerificationFailed, ExportError
from runtime.decoder import DecoderSpan, SequenceKV
from runtime.decoder_load import load_decoder_span
from runtime.package import PackageRef
from runtime.session import SessionSettings

DATA = Path(__file__).parent / "data"
PROMPTS_FILE = DATA / "generation_prompts.json"
PERPLEXITY_FILE = DATA / "perplexity_text.txt"
ATOL = 1e-3
TIE_GAP = 2e-3
ANSWER_TOKENS = 40

Messages = list[dict[str, str]]


@dataclass
class Reference:
    """PyTorch's greedy answer to one prompt: logits[s] is the step that chose tokens[s]."""

    prompt_ids: list[int]
    tokens: list[int]
    logits: np.ndarray  # [steps, vocab] float32


@dataclass
class StepCheck:
    steps: int = 0
    max_abs_diff: float = 0.0
    near_ties: int = 0
    failures: list[str] = field(default_factory=list)

    def add(self, other: StepCheck) -> None:
        self.steps += other.steps
        self.max_abs_diff = max(self.max_abs_diff, other.max_abs_diff)
        self.near_ties += other.near_ties
        self.failures += other.failures


class DecoderChain:
    """Spans chained in one process as a ring of nodes runs them: hidden states go from one
    span to the next, each span keeps its own rows' KV."""

    def __init__(self, spans: list[DecoderSpan]) -> None:
        if not spans or not spans[0].is_first or not spans[-1].is_last:
            raise ExportError("a chain needs spans from the first layer to the last")
        self.spans = spans

    def new_sequences(self, batch: int) -> list[list[SequenceKV]]:
        return [[span.empty_kv() for _ in range(batch)] for span in self.spans]

    def step(
        self, kvs: list[list[SequenceKV]], inputs: np.ndarray, new_tokens: list[int] | None = None
    ) -> np.ndarray:
        x = inputs
        for span, rows in zip(self.spans, kvs, strict=True):
            x = span.step(rows, x, new_tokens)
        return x


def load_chain(
    package: PackageRef, stages: list[list[int]], settings: SessionSettings
) -> DecoderChain:
    return DecoderChain([load_decoder_span(package, settings, a, b) for a, b in stages])


def load_prompts(path: Path = PROMPTS_FILE) -> list[Messages]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        prompts = raw["prompts"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ExportError(f"{path}: cannot read the prompts ({exc!r})") from exc
    if not isinstance(prompts, list) or len(prompts) < 2:
        raise ExportError(f"{path}: 'prompts' must be a list of at least 2 chat message lists")
    return prompts


def render_prompt(tokenizer: Any, messages: Messages) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return [int(i) for i in ids]
    text = "\n".join(m["content"] for m in messages) + "\n"
    return [int(i) for i in tokenizer(text).input_ids]


def text_ids(tokenizer: Any, text: str, limit: int) -> list[int]:
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False).input_ids]
    return ids[:limit]


def torch_reference(model: Any, prompt_ids: list[int], answer_tokens: int) -> Reference:
    """Greedy decode with the model's own KV cache, keeping every step's logits."""
    import torch

    logits: list[np.ndarray] = []
    tokens: list[int] = []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
        for step in range(answer_tokens):
            logits.append(out.logits[0, -1].float().numpy().copy())
            tokens.append(int(np.argmax(logits[-1])))
            if step + 1 < answer_tokens:
                out = model(
                    input_ids=torch.tensor([[tokens[-1]]]),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
    return Reference(prompt_ids, tokens, np.stack(logits))


def teacher_force(chain: DecoderChain, prompt_ids: list[int], tokens: list[int]) -> np.ndarray:
    """Logits of each step: the prompt, then tokens[:-1] one at a time."""
    kvs = chain.new_sequences(1)
    out = [chain.step(kvs, np.array([prompt_ids], np.int64))[0]]
    for token in tokens[:-1]:
        out.append(chain.step(kvs, np.array([[token]], np.int64))[0])
    return np.stack(out)


def teacher_force_batch(
    chain: DecoderChain, refs: list[Reference], pad_id: int
) -> list[np.ndarray]:
    """The same for a left-padded batch of the references' prompts (equal answer lengths)."""
    longest = max(len(r.prompt_ids) for r in refs)
    ids = np.full((len(refs), longest), pad_id, np.int64)
    for row, ref in enumerate(refs):
        ids[row, longest - len(ref.prompt_ids) :] = ref.prompt_ids
    kvs = chain.new_sequences(len(refs))
    first = chain.step(kvs, ids, [len(r.prompt_ids) for r in refs])
    rows: list[list[np.ndarray]] = [[first[i]] for i in range(len(refs))]
    for step in range(len(refs[0].tokens) - 1):
        feed = np.array([[r.tokens[step]] for r in refs], np.int64)
        logits = chain.step(kvs, feed)
        for i in range(len(refs)):
            rows[i].append(logits[i])
    return [np.stack(r) for r in rows]


def check_steps(
    want: np.ndarray, got: np.ndarray, where: str, atol: float = ATOL, tie_gap: float = TIE_GAP
) -> StepCheck:
    check = StepCheck(steps=int(want.shape[0]))
    for step in range(want.shape[0]):
        diff = float(np.max(np.abs(want[step].astype(np.float64) - got[step])))
        check.max_abs_diff = max(check.max_abs_diff, diff)
        if not diff <= atol:  # NaN fails too
            check.failures.append(f"{where} step {step}: max abs diff {diff:.3g} > atol {atol:g}")
        top2 = np.partition(want[step], -2)[-2:]
        gap = float(top2[1] - top2[0])
        if gap < tie_gap:
            check.near_ties += 1
        elif int(np.argmax(got[step])) != int(np.argmax(want[step])):
            check.failures.append(
                f"{where} step {step}: ONNX argmax {int(np.argmax(got[step]))} != PyTorch "
                f"{int(np.argmax(want[step]))} (PyTorch top-1/top-2 gap {gap:.3g})"
            )
    return check


def batch_pair(refs: list[Reference]) -> list[Reference]:
    """Two references whose prompts differ in length (the shortest and the longest)."""
    ordered = sorted(refs, key=lambda r: len(r.prompt_ids))
    if len(ordered[0].prompt_ids) == len(ordered[-1].prompt_ids):
        raise ExportError("the prompts all have one length; a padded batch needs two lengths")
    return [ordered[-1], ordered[0]]


def verify_chain(
    chain: DecoderChain,
    refs: list[Reference],
    pad_id: int,
    progress: Callable[[str], AbstractContextManager[Any]] | None = None,
    atol: float = ATOL,
    tie_gap: float = TIE_GAP,
) -> dict[str, Any]:
    """Teacher-force every reference and the padded pair; the figures, or a typed failure."""

    def step(what: str) -> AbstractContextManager[Any]:
        return progress(what) if progress is not None else nullcontext()

    total = StepCheck()
    for k, ref in enumerate(refs):
        with step(f"verifying prompt {k + 1}/{len(refs)} ({len(ref.tokens)} steps)"):
            got = teacher_force(chain, ref.prompt_ids, ref.tokens)
            total.add(check_steps(ref.logits, got, f"prompt {k}", atol, tie_gap))
    pair = batch_pair(refs)
    batch = StepCheck()
    with step("verifying a left-padded batch of 2"):
        rows = teacher_force_batch(chain, pair, pad_id)
        for row, (ref, got) in enumerate(zip(pair, rows, strict=True)):
            batch.add(check_steps(ref.logits, got, f"batch-2 row {row}", atol, tie_gap))
    failures = total.failures + batch.failures
    if failures:
        raise DecoderVerificationFailed("the chained segments versus PyTorch", failures)
    return {
        "atol": atol,
        "tie_gap": tie_gap,
        "prompts": len(refs),
        "answer_tokens": len(refs[0].tokens),
        "steps_checked": total.steps,
        "max_abs_diff": float(f"{total.max_abs_diff:.3g}"),
        "near_ties": total.near_ties,
        "batch2": {
            "prompt_tokens": [len(r.prompt_ids) for r in pair],
            "steps_checked": batch.steps,
            "max_abs_diff": float(f"{batch.max_abs_diff:.3g}"),
            "near_ties": batch.near_ties,
            "passed": True,
        },
    }


def perplexity(chain: DecoderChain, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:] given their prefixes, one token a step."""
    if len(ids) < 2:
        raise ExportError("perplexity needs a text of at least 2 tokens")
    kvs = chain.new_sequences(1)
    nll = 0.0
    for i in range(1, len(ids)):
        logits = chain.step(kvs, np.array([[ids[i - 1]]], np.int64))[0].astype(np.float64)
        top = float(np.max(logits))
        log_total = top + math.log(float(np.sum(np.exp(logits - top))))
        nll += log_total - float(logits[ids[i]])
    return math.exp(nll / (len(ids) - 1))


def agreement(chain: DecoderChain, refs: list[Reference]) -> float:
    """Share of teacher-forced steps whose argmax equals PyTorch's (fp32) argmax."""
    same = total = 0
    for ref in refs:
        got = teacher_force(chain, ref.prompt_ids, ref.tokens)
        same += int(np.sum(np.argmax(got, axis=1) == np.argmax(ref.logits, axis=1)))
        total += len(ref.tokens)
    return same / total


def greedy(
    chain: DecoderChain, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]
) -> list[int]:
    """Greedy answer through the chain, stopping at an eos id (not included)."""
    kvs = chain.new_sequences(1)
    logits = chain.step(kvs, np.array([prompt_ids], np.int64))
    answer: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits[0]))
        if token in eos_ids:
            break
        answer.append(token)
        logits = chain.step(kvs, np.array([[token]], np.int64))
    return answer
