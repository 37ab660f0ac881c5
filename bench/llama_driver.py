"""llama.cpp driver for bench/llama_cpp.py: runs in bench/.llama-venv (llama-cpp-python), never
in the project's venv, and imports nothing of the project.

    python llama_driver.py '{"model": PATH, "threads": 2, "context": 1024, "mark": "LLAMABENCH "}'

Prints ``MARK {"kind": "ready", ...}``, then answers each JSON line on stdin:

- ``{"prompt_ids": [...], "new_tokens": N}``: one sequence through ``Llama.generate`` (which runs
  one sequence at a time), answered with ``MARK {"kind": "round", "ttft_s", "decode_s",
  "tokens", "cpu_s"}``: the prompt evaluated from an empty cache, then N greedy tokens (EOS is
  not a stop: ``Llama.generate`` never stops by itself);
- ``{"batch": [[...], ...], "new_tokens": N}``: the prompts as that many sequences of one
  context through the low-level API (``llama_batch_init``, ``llama_decode`` with one ``seq_id``
  per sequence, ``n_seq_max`` = the number of prompts, ``llama_get_logits_ith``): each prompt
  prefilled alone into its sequence, then every sequence's next token decoded as ONE batch per
  step, the argmax of each row taken here (greedy, EOS no stop). Answered with ``MARK {"kind":
  "batch", "times": [[s, ...], ...], "tokens": [[...], ...], "cpu_s", "context": {...}}``: each
  sequence's token times in seconds from the round's start. The context of each batch size is
  made once, before its first round (not timed), and its memory cleared before every round.

Ends at EOF.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from typing import Any


class Batched:
    """One low-level context holding ``sequences`` sequences of up to ``per_sequence`` tokens
    each (``kv_unified`` off: every sequence has its own KV stream of that size)."""

    def __init__(self, llama_cpp: Any, model: Any, threads: int, sequences: int,
                 per_sequence: int) -> None:  # fmt: skip
        import numpy as np

        self.lib, self.np = llama_cpp, np
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = sequences * per_sequence
        params.n_batch = max(512, per_sequence, sequences)
        params.n_ubatch = params.n_batch
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError(f"llama_init_from_model failed for {sequences} sequences")
        self.sequences, self.per_sequence = sequences, per_sequence
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.capacity = int(params.n_batch)
        self.batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)
        self.settings = {
            "n_ctx": int(llama_cpp.llama_n_ctx(self.ctx)),
            "n_seq_max": sequences,
            "n_batch": self.capacity,
            "kv_unified": bool(params.kv_unified),
            "threads": threads,
        }

    def _fill(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """(token, position, sequence, wants logits) per row of the batch."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logits else 0
        b.n_tokens = len(rows)

    def _decode(self) -> None:
        rc = self.lib.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        row = self.lib.llama_get_logits_ith(self.ctx, i)
        values = self.np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)),
                                            shape=(self.vocab,))  # fmt: skip
        return int(values.argmax())

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        if len(prompts) > self.sequences:
            raise ValueError(f"{len(prompts)} prompts for a context of {self.sequences}")
        longest = max(len(p) for p in prompts)
        if longest + new_tokens > self.per_sequence or longest > self.capacity:
            raise ValueError(f"{longest} + {new_tokens} tokens exceed {self.per_sequence}")
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        times: list[list[float]] = [[] for _ in prompts]
        tokens: list[list[int]] = [[] for _ in prompts]
        cpu = time.process_time()
        started = time.perf_counter()
        for s, prompt in enumerate(prompts):  # each prompt alone, logits of its last token
            self._fill([(t, k, s, k == len(prompt) - 1) for k, t in enumerate(prompt)])
            self._decode()
            tokens[s].append(self._argmax(len(prompt) - 1))
            times[s].append(time.perf_counter() - started)
        for step in range(1, new_tokens):  # one decode batch: every sequence's last token
            self._fill([(tokens[s][-1], len(p) + step - 1, s, True)
                        for s, p in enumerate(prompts)])  # fmt: skip
            self._decode()
            picked = [self._argmax(i) for i in range(len(prompts))]
            now = time.perf_counter() - started
            for s, token in enumerate(picked):
                tokens[s].append(token)
                times[s].append(now)
        return {"kind": "batch", "times": times, "tokens": tokens,
                "cpu_s": time.process_time() - cpu, "context": self.settings}  # fmt: skip


def main() -> int:
    # run as a script from bench/, whose llama_cpp.py would shadow the real llama_cpp package
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    config = json.loads(sys.argv[1])
    mark = config["mark"]

    def say(record: dict[str, Any]) -> None:
        print(mark + json.dumps(record), flush=True)

    try:
        import llama_cpp

        threads = int(config["threads"])
        llm = llama_cpp.Llama(
            model_path=config["model"],
            n_ctx=int(config["context"]),
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            seed=0,
            verbose=False,
        )
    except Exception as exc:  # whatever fails to start is reported, not raised
        say({"kind": "error", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    say(
        {
            "kind": "ready",
            "llama_cpp_python": llama_cpp.__version__,
            "threads": threads,
            "n_ctx": llm.n_ctx(),
            "n_batch": 512,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        }
    )
    contexts: dict[tuple[int, int], Batched] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        wanted = int(request["new_tokens"])
        try:
            if "batch" in request:
                prompts = [[int(i) for i in p] for p in request["batch"]]
                size = (len(prompts), int(request.get("per_sequence") or config["context"]))
                if size not in contexts:
                    contexts[size] = Batched(llama_cpp, llm.model, threads, *size)
                say(contexts[size].run(prompts, wanted))
                continue
            say(single(llm, [int(i) for i in request["prompt_ids"]], wanted))
        except Exception as exc:
            say({"kind": "error", "error": f"{type(exc).__name__}: {exc}"})
            return 1
    return 0


def single(llm: Any, prompt: list[int], wanted: int) -> dict[str, Any]:
    """One sequence through ``Llama.generate`` from an empty cache."""
    llm.reset()  # n_tokens = 0: no prefix reuse, the prompt is evaluated afresh
    tokens: list[int] = []
    times: list[float] = []
    cpu = time.process_time()
    started = time.perf_counter()
    for token in llm.generate(
        prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
    ):
        times.append(time.perf_counter())
        tokens.append(int(token))
        if len(tokens) >= wanted:
            break
    cpu = time.process_time() - cpu
    return {
        "kind": "round",
        "ttft_s": times[0] - started,
        "decode_s": times[-1] - times[0],
        "tokens": tokens,
        "cpu_s": cpu,
    }


if __name__ == "__main__":
    sys.exit(main())
