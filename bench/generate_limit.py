"""Side (a) of bench/generate.py, the limit: a greedy loop over optimum's one-graph export with
the KV cache preallocated. Written without the appliance's code (no runtime/, no exporter/).

The graph: ``optimum.exporters.onnx.main_export(task="text-generation-with-past")`` of the same
fp32 weights (SmolLM2's GGUF dequantised by transformers, saved as a Hugging Face folder), with
one change: the LM head reads the last position only (a Slice before its MatMul), so a 512-token
prefill computes one row of logits, not 512 (the appliance's graphs do the same).

The KV: optimum's graph concatenates past and new keys/values into ``present.*``, so a step must
write a new tensor one token longer than its input. Every layer's keys and values get two flat
buffers sized for the longest sequence, bound with IO binding: step t reads ``past`` from one
buffer (viewed as [1, heads, L, dim]) and writes ``present`` into the other ([1, heads, L+T,
dim]); the next step swaps them. No allocation and no copy out of onnxruntime per step; the
concatenation's own copy (the whole cache, each step) is the graph's and stays. Logits go into a
preallocated [1, 1, vocab] buffer; mask and positions are views of preallocated arrays.

Batched (``BatchLimitRunner``, bench/generate_batch.py's side O): the same graph and buffers with
a batch dimension. The N prompts are left-padded into one [N, longest] prefill (mask 0 on the
pads, each row's positions counting from its first real token), then every step decodes the N
streams' last tokens as one [N, 1] batch over the padded cache; argmax per row in numpy.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.generate_common import Round, smollm2_gguf

HF_FOLDER = "smollm2-hf-fp32"
OPTIMUM_FOLDER = "smollm2-optimum"
LIMIT_GRAPH = "model_last_logits.onnx"


def ensure_hf_folder(work: Path, say: Any = print) -> Path:
    """The GGUF's weights in fp32 as a Hugging Face folder (config, safetensors, tokenizer)."""
    folder = work / HF_FOLDER
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    started = time.perf_counter()
    say(f"loading {gguf.name} into transformers (fp32, ~20 s)")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = work / f".tmp-{HF_FOLDER}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(folder)
    say(f"saved {folder} in {time.perf_counter() - started:.0f}s")
    return folder


def ensure_limit_graph(work: Path, say: Any = print) -> Path:
    """optimum's export of the HF folder, then the last-position LM head variant beside it."""
    folder = work / OPTIMUM_FOLDER
    graph = folder / LIMIT_GRAPH
    if graph.is_file():
        return graph
    hf = ensure_hf_folder(work, say)
    if not (folder / "model.onnx").is_file():
        from optimum.exporters.onnx import main_export

        started = time.perf_counter()
        say("exporting with optimum (text-generation-with-past, one graph, ~25 s)")
        tmp = work / f".tmp-{OPTIMUM_FOLDER}"
        shutil.rmtree(tmp, ignore_errors=True)
        main_export(
            str(hf),
            output=str(tmp),
            task="text-generation-with-past",
            device="cpu",
            do_validation=False,  # check_variant compares the graph the bench runs
        )
        tmp.rename(folder)
        say(f"exported {folder} in {time.perf_counter() - started:.0f}s")
    last_logits_variant(folder / "model.onnx", graph)
    return graph


def last_logits_variant(source: Path, target: Path) -> Path:
    """``source`` with a Slice of the last position before the node that makes ``logits``.

    Weights kept in an external data file stay there (the new graph names it the same way,
    hence ``target`` beside ``source``); weights inside the graph are written out again.
    """
    import onnx
    from onnx import TensorProto, helper

    if source.parent.resolve() != target.parent.resolve():
        raise ValueError("the variant must sit beside the source graph (it shares its weights)")
    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    producer = next((n for n in graph.node if "logits" in n.output), None)
    if producer is None or producer.op_type not in ("MatMul", "Gemm"):
        what = producer.op_type if producer is not None else "nothing"
        raise ValueError(f"logits come from {what}, not the LM head's MatMul: cannot cut it")
    hidden = producer.input[0]
    names = ("last_logits_starts", "last_logits_ends", "last_logits_axes")
    for name, value in zip(names, (-1, 2**62, 1), strict=True):
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
    cut = helper.make_node("Slice", [hidden, *names], ["hidden_last_position"], "last_position")
    producer.input[0] = "hidden_last_position"
    at = list(graph.node).index(producer)
    graph.node.insert(at, cut)
    onnx.save(model, str(target))
    return target


class LimitRunner:
    """onnxruntime session + preallocated, IO-bound KV for one sequence of up to ``capacity``
    tokens."""

    def __init__(self, graph: Path, threads: int, capacity: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # as the appliance's sessions: pools do not spin between runs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = sorted(
            (n for n in inputs if n.startswith("past_key_values.")),
            key=lambda n: (int(n.split(".")[1]), n),
        )
        if not self.past or "position_ids" not in inputs:
            raise ValueError(f"{graph} is not a decoder with past: inputs {list(inputs)}")
        shape = inputs[self.past[0]].shape  # [batch, heads, past, dim]
        self.heads, self.dim = int(shape[1]), int(shape[3])
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.vocab = int(logits.shape[-1])
        self.capacity = capacity
        size = self.heads * capacity * self.dim
        # two buffers per past tensor: read one, write the other, swap
        self.buffers = [[np.zeros(size, np.float32) for _ in self.past] for _ in range(2)]
        self.ids = np.zeros((1, capacity), np.int64)
        self.mask = np.ones((1, capacity), np.int64)
        self.positions = np.arange(capacity, dtype=np.int64)[None, :]
        self.logits = np.zeros((1, 1, self.vocab), np.float32)
        self.binding = self.session.io_binding()
        self.binding.bind_output(
            "logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data
        )

    def _bind(self, name: str, array: np.ndarray, output: bool = False) -> None:
        bind = self.binding.bind_output if output else self.binding.bind_input
        bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    def step(self, ids: list[int], length: int, side: int) -> int:
        """Run ``ids`` after ``length`` cached tokens (in buffer set ``side``); the argmax."""
        count = len(ids)
        total = length + count
        if total > self.capacity:
            raise ValueError(f"{total} tokens exceed the preallocated {self.capacity}")
        self.ids[0, :count] = ids
        self._bind("input_ids", self.ids[:, :count])
        self._bind("attention_mask", self.mask[:, :total])
        self._bind("position_ids", self.positions[:, length:total])
        read, write = self.buffers[side], self.buffers[1 - side]
        for k, name in enumerate(self.past):
            past = read[k][: self.heads * length * self.dim]
            present = write[k][: self.heads * total * self.dim]
            self._bind(name, past.reshape(1, self.heads, length, self.dim))
            self._bind(
                name.replace("past_key_values", "present"),
                present.reshape(1, self.heads, total, self.dim),
                output=True,
            )
        self.session.run_with_iobinding(self.binding)
        return int(np.argmax(self.logits[0, 0]))

    def last_logits(self) -> np.ndarray:
        return self.logits[0, 0].copy()

    def generate(self, prompt: list[int], new_tokens: int) -> Round:
        started = time.perf_counter()
        token = self.step(prompt, 0, 0)
        first = time.perf_counter()
        tokens = [token]
        length, side = len(prompt), 1
        for _ in range(new_tokens - 1):
            token = self.step([token], length, side)
            tokens.append(token)
            length, side = length + 1, 1 - side
        return Round(first - started, time.perf_counter() - first, tokens)


def left_pad(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``prompts`` right-aligned in one [N, longest] batch: ids (``pad`` before each shorter
    prompt), attention mask (0 on pads) and positions (0 on pads, then 0, 1, ... per row)."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("left_pad needs at least one prompt and no empty prompt")
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad, np.int64)
    mask = np.zeros((len(prompts), longest), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = prompt
        mask[row, longest - len(prompt) :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


class BatchLimitRunner(LimitRunner):
    """``LimitRunner`` for up to ``streams`` sequences decoded as one batch."""

    def __init__(self, graph: Path, threads: int, capacity: int, streams: int) -> None:
        super().__init__(graph, threads, 1)  # the session and its shapes; buffers made here
        self.streams, self.capacity = streams, capacity
        size = streams * self.heads * capacity * self.dim
        self.buffers = [[np.zeros(size, np.float32) for _ in self.past] for _ in range(2)]
        self.batch_logits = np.zeros((streams, 1, self.vocab), np.float32)

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, length: int,
             side: int) -> np.ndarray:  # fmt: skip
        """One step of the whole batch after ``length`` cached positions; argmax per row."""
        rows, count = ids.shape
        total = length + count
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        self._bind("input_ids", ids)
        self._bind("attention_mask", mask)
        self._bind("position_ids", positions)
        logits = self.batch_logits[:rows]
        self._bind("logits", logits, output=True)
        read, write = self.buffers[side], self.buffers[1 - side]
        for k, name in enumerate(self.past):
            past = read[k][: rows * self.heads * length * self.dim]
            present = write[k][: rows * self.heads * total * self.dim]
            self._bind(name, past.reshape(rows, self.heads, length, self.dim))
            self._bind(
                name.replace("past_key_values", "present"),
                present.reshape(rows, self.heads, total, self.dim),
                output=True,
            )
        self.session.run_with_iobinding(self.binding)
        return np.argmax(logits[:, 0], axis=1)

    def generate_batch(
        self, prompts: list[list[int]], new_tokens: int, pad: int = 0
    ) -> tuple[float, list[list[float]], list[list[int]]]:
        """The round's start, each stream's token times and its tokens."""
        rows = len(prompts)
        if rows > self.streams:
            raise ValueError(f"{rows} prompts for a runner of {self.streams} streams")
        ids, mask, positions = left_pad(prompts, pad)
        longest = ids.shape[1]
        if longest + new_tokens > self.capacity:
            raise ValueError(
                f"{longest + new_tokens} tokens exceed the preallocated {self.capacity}"
            )
        full_mask = np.ones((rows, longest + new_tokens), np.int64)
        full_mask[:, :longest] = mask
        next_position = positions[:, -1:] + 1
        started = time.perf_counter()
        picked = self._run(ids, mask, positions, 0, 0)
        now = time.perf_counter()
        tokens = [[int(t)] for t in picked]
        times = [[now] for _ in prompts]
        length, side = longest, 1
        for step in range(new_tokens - 1):
            step_ids = np.array([[t[-1]] for t in tokens], np.int64)
            step_mask = np.ascontiguousarray(full_mask[:, : length + 1])  # bound by address
            picked = self._run(step_ids, step_mask, next_position + step,
                               length, side)  # fmt: skip
            now = time.perf_counter()
            for row, token in enumerate(picked):
                tokens[row].append(int(token))
                times[row].append(now)
            length, side = length + 1, 1 - side
        return started, times, tokens


def check_variant(graph: Path, threads: int) -> float:
    """Max abs diff between the variant's last logits and the original graph's on a fixed
    40-token prompt; computed once, then read from ``variant_check.json`` beside the graph."""
    import json

    import onnxruntime as ort

    record = graph.parent / "variant_check.json"
    if record.is_file():
        return float(json.loads(record.read_text())["max_abs_diff"])
    prompt = list(range(100, 140))
    original = ort.InferenceSession(
        str(graph.parent / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.array([prompt], np.int64),
        "attention_mask": np.ones((1, len(prompt)), np.int64),
        "position_ids": np.arange(len(prompt), dtype=np.int64)[None, :],
    }
    for spec in original.get_inputs():
        if spec.name.startswith("past_key_values."):
            feeds[spec.name] = np.zeros((1, int(spec.shape[1]), 0, int(spec.shape[3])), np.float32)
    want = original.run(["logits"], feeds)[0][0, -1]
    del original
    runner = LimitRunner(graph, threads, len(prompt))
    runner.step(prompt, 0, 0)
    diff = float(np.max(np.abs(runner.last_logits() - want)))
    record.write_text(json.dumps({"prompt": prompt, "max_abs_diff": diff}) + "\n")
    return diff
