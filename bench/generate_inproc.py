"""Sides (b) and (d) of bench/generate.py: the appliance's runtime in one process, and PyTorch.

(b) ``runtime.decoder.DecoderSpan`` over the appliance's generation package (the segments that
nodes serve): one span over every segment, or the package's segments as 3 spans chained the way
a ring runs them (``exporter.decoder_verify.DecoderChain``), each span one merged session; the
token chosen by ``runtime.sampling.sample`` (greedy), as a node holding the LM head does.
(d) ``transformers``' ``generate`` on the same fp32 weights, greedy, its length forced with
``min_new_tokens = max_new_tokens``; a streamer records when each token comes out.
``TorchRunner.generate_batch`` (bench/generate_batch.py's side P): N prompts left-padded into
one batch (pad = EOS, mask 0 on the pads) through the same ``generate``; every stream gets each
token at the same step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.generate_common import Round

PACKAGE_NAME = "smollm2"
EXPORT_STAGES = 3


def package_repo(work: Path, precision: str) -> Path:
    return work / f"repo-{precision}"


def ensure_package(work: Path, precision: str, say: Any = print) -> Path:
    """The generation package ``smollm2`` (fp32 or int4, 3 default stages) in its own repo
    under ``work``, exported once; returns the repository."""
    import sys

    from exporter.generation_export import export_generation

    repo = package_repo(work, precision)
    if (repo / PACKAGE_NAME / "1" / "manifest.json").is_file():
        return repo
    started = time.perf_counter()
    say(f"exporting the appliance's {precision} generation package into {repo} (minutes)")
    export_generation(
        source="smollm2",
        model_repo=repo,
        name=PACKAGE_NAME,
        stages=EXPORT_STAGES,
        quantize=None if precision == "fp32" else precision,
        force=precision != "fp32",  # int4's perplexity ratio (~1.34) is past the default limit
        progress=sys.stdout,
    )
    say(f"exported {repo} in {time.perf_counter() - started:.0f}s")
    return repo


def package_encodes(repo: Path, text: str) -> list[int]:
    """``text``'s ids as the appliance's coordinator tokenises it (runtime/text.py)."""
    return package_encoder(repo)(text)


def package_encoder(repo: Path) -> Callable[[str], list[int]]:
    """The package's ``encode`` (text -> ids), its tokenizer loaded once."""
    from runtime.package import open_package
    from runtime.text import PackageText

    package = open_package(repo, PACKAGE_NAME)
    info = package.manifest.generation if package.manifest is not None else None
    assert info is not None
    text_side = PackageText.open(
        package.folder, info.tokenizer, info.chat_template, info.bos_token_id, info.eos_token_ids
    )
    encode: Callable[[str], list[int]] = text_side.encode
    return encode


def quantization_figures(repo: Path) -> dict[str, Any] | None:
    from runtime.package import open_package

    manifest = open_package(repo, PACKAGE_NAME).manifest
    figures = manifest.verification.get("quantization") if manifest is not None else None
    return dict(figures) if figures else None


class ApplianceRunner:
    """The package's segments as ``spans`` spans (1: every segment in one span)."""

    def __init__(self, repo: Path, spans: int, threads: int) -> None:
        from exporter.decoder_verify import DecoderChain
        from exporter.partition import default_grouping
        from runtime.decoder_load import load_decoder_span
        from runtime.package import open_package
        from runtime.sampling import SamplingParams
        from runtime.session import SessionSettings

        package = open_package(repo, PACKAGE_NAME)
        assert package.manifest is not None
        last = len(package.segments) - 1
        if spans == 1:
            stages = [[0, last]]
        elif len(package.manifest.default_stages) == spans:
            stages = [list(s) for s in package.manifest.default_stages]
        else:
            stages = default_grouping([s.bytes for s in package.segments], spans)
        settings = SessionSettings(device="cpu", intra_op_threads=threads)
        self.stages = stages
        self.chain = DecoderChain([load_decoder_span(package, settings, a, b) for a, b in stages])
        self.params = SamplingParams(temperature=0.0)

    def generate(self, prompt: list[int], new_tokens: int) -> Round:
        from runtime.sampling import sample

        kvs = self.chain.new_sequences(1)
        started = time.perf_counter()
        logits = self.chain.step(kvs, np.array([prompt], np.int64))
        token, _ = sample(logits[0], self.params, len(prompt))
        first = time.perf_counter()
        tokens = [token]
        for k in range(1, new_tokens):
            logits = self.chain.step(kvs, np.array([[token]], np.int64))
            token, _ = sample(logits[0], self.params, len(prompt) + k)
            tokens.append(token)
        return Round(first - started, time.perf_counter() - first, tokens)


class TorchRunner:
    """``model.generate`` on the HF folder's fp32 weights with ``threads`` intra-op threads."""

    def __init__(self, folder: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        self.model.eval()
        self.threads = torch.get_num_threads()

    def generate(self, prompt: list[int], new_tokens: int) -> Round:
        config = self._config(new_tokens)
        streamer = _times()
        ids = self.torch.tensor([prompt], dtype=self.torch.long)
        started = time.perf_counter()
        with self.torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=self.torch.ones_like(ids),
                generation_config=config,
                streamer=streamer,
            )
        return Round(
            streamer.times[0] - started, streamer.times[-1] - streamer.times[0], streamer.tokens
        )

    def generate_batch(
        self, prompts: list[list[int]], new_tokens: int
    ) -> tuple[float, list[list[float]], list[list[int]]]:
        """The prompts left-padded as one batch: the start, each stream's token times and its
        tokens (the streamer sees one [N] tensor per step)."""
        config = self._config(new_tokens)
        longest = max(len(p) for p in prompts)
        pad = int(config.pad_token_id)
        ids = self.torch.tensor(
            [[pad] * (longest - len(p)) + list(p) for p in prompts], dtype=self.torch.long
        )
        mask = self.torch.tensor(
            [[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=self.torch.long
        )
        streamer = _times()
        started = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, streamer=streamer
            )
        tokens = [[int(t) for t in row] for row in out[:, longest:].tolist()]
        return started, [list(streamer.times) for _ in prompts], tokens

    def _config(self, new_tokens: int) -> Any:
        from transformers import GenerationConfig

        eos = self.model.config.eos_token_id
        return GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos if isinstance(eos, int) else (eos or [0])[0],
        )


def _times() -> Any:
    """A streamer for ``generate`` that records when each step's tokens (one per row) come."""
    from transformers.generation.streamers import BaseStreamer

    class Times(BaseStreamer):
        """put() gets the prompt once, then each step's new tokens as they are chosen."""

        def __init__(self) -> None:
            self.prompt_seen = False
            self.times: list[float] = []
            self.tokens: list[int] = []

        def put(self, value: Any) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter())
            self.tokens += [int(t) for t in value.reshape(-1).tolist()]

        def end(self) -> None:
            pass

    return Times()
