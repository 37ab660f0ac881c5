"""The decoder span a node serves for a generation package: one step for a batch of sequences.

A span runs decoder layers first_layer..first_layer+layers-1 (one or more package segments).
Each sequence's KV for those layers lives here, in a ``SequenceKV``, and never crosses the
network: only input ids (first span), hidden states and, from the last span, logits do.

Graph interface (written by exporter/decoder_export.py): inputs ``input_ids`` [B, T] INT64 or
``hidden.{L}`` [B, T, H] FP32, ``attention_mask`` [B, past + T] INT64 (1 = real, rows
left-padded), ``position_ids`` [B, T] INT64, ``past.{l}.key|value`` [B, kv_heads, past, head_dim];
outputs ``hidden.{L'}`` or ``logits`` [B, vocab] (each row's last position) and
``present.{l}.key|value`` [B, kv_heads, past + T, head_dim].

Batches: rows' pasts may differ in length; they are left-padded to the longest for the run (the
mask hides the padding). Each row's KV then stays a row of the run's presents (``BatchKV``,
runtime/batch_kv.py): a next step with the same rows, in any order, feeds them as they are, and
only a step whose rows changed gathers the pasts afresh. A prompt (a batch of one) feeds its KV
as it is: no copy besides the graph's own concatenation.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.batch_kv import SequenceKV, attach_rows, gather_past
from runtime.errors import (
    ContextOverflow,
    DecoderStepFailed,
    InputMismatch,
    InvalidRequest,
    ModelLoadError,
    ShapeMismatch,
)
from runtime.manifest import GenerationInfo, KvLayout, SegmentInfo
from runtime.session import ModelSession

log = logging.getLogger(__name__)

_PAST = re.compile(r"past\.(\d+)\.key")
_HIDDEN = re.compile(r"hidden\.(\d+)")
INPUT_IDS = "input_ids"
LOGITS = "logits"
_KV_DTYPES = {"FP32": np.float32, "FP16": np.float16}

__all__ = ["DecoderSpan", "SequenceKV"]  # SequenceKV: its old home


@dataclass(frozen=True)
class _Stage:
    """One onnxruntime session of the span and the interface names it reads and writes."""

    session: ModelSession
    input_name: str
    output_name: str
    layers: list[int]  # absolute layer indices, in order


class DecoderSpan:
    """Runs a span's sessions in order for one step of a batch of sequences."""

    def __init__(
        self, sessions: list[ModelSession], segments: list[SegmentInfo], info: GenerationInfo
    ) -> None:
        if not sessions or not segments:
            raise ModelLoadError("a decoder span needs at least one segment and one session")
        layouts = [s.kv for s in segments]
        if any(kv is None for kv in layouts):
            missing = [s.file for s in segments if s.kv is None]
            raise ModelLoadError(
                f"segment(s) {', '.join(missing)} have no KV layout; a decoder span takes the "
                "segments of a generation package (manifest kind 'generation')"
            )
        kvs: list[KvLayout] = [kv for kv in layouts if kv is not None]
        self.first_layer = kvs[0].first_layer
        expected: list[int] = []
        for kv in kvs:
            if kv.first_layer != self.first_layer + len(expected) or kv.layers < 1:
                spans = [(k.first_layer, k.layers) for k in kvs]
                raise ModelLoadError(
                    f"segments' layers (first, count) {spans} are not consecutive; a span takes "
                    "a package's segments first..last in order"
                )
            expected += range(kv.first_layer, kv.first_layer + kv.layers)
        self.layers = len(expected)
        self.info = info
        self.kv_heads = kvs[0].kv_heads
        self.head_dim = kvs[0].head_dim
        self.kv_dtype = _KV_DTYPES.get(kvs[0].dtype, np.float32)
        self.kv_bytes_per_token = sum(kv.bytes_per_token() for kv in kvs)
        self._stages = [_stage(s) for s in sessions]
        got = [layer for stage in self._stages for layer in stage.layers]
        if got != expected:
            raise ModelLoadError(
                f"the sessions hold layers {got}, the segments describe {expected}"
            )
        for before, after in zip(self._stages, self._stages[1:], strict=False):
            if before.output_name != after.input_name:
                raise ModelLoadError(
                    f"session {before.session.source} outputs {before.output_name} but the next, "
                    f"{after.session.source}, takes {after.input_name}"
                )
        self.is_first = self._stages[0].input_name == INPUT_IDS
        self.is_last = self._stages[-1].output_name == LOGITS
        # False: the design before runtime/batch_kv.py (every batched step gathers the pasts and
        # copies each row's tokens back out), kept for the benchmark's side by side
        self.keep_batches = True
        # steps whose KV stays a batch run through IO binding and keep the presents where the
        # session put them (GPU memory on CUDA): SessionSettings.decode_io_binding
        self.io_binding = self.device == "cuda"
        # the same sessions with more threads, for the steps that run alone (use_alone_sessions)
        self._alone_stages: list[_Stage] | None = None

    def use_alone_sessions(self, sessions: list[ModelSession]) -> None:
        """Give the span a second set of its sessions (the same graphs, more threads) that
        ``step(..., alone=True)`` runs on; they must hold the same layers and names."""
        stages = [_stage(s) for s in sessions]
        shape = [(t.input_name, t.output_name, t.layers) for t in stages]
        if shape != [(t.input_name, t.output_name, t.layers) for t in self._stages]:
            raise ModelLoadError(
                f"the alone sessions hold {shape}, the span's sessions "
                f"{[(t.input_name, t.output_name, t.layers) for t in self._stages]}"
            )
        self._alone_stages = stages

    @property
    def has_alone_sessions(self) -> bool:
        return self._alone_stages is not None

    @property
    def alone_sessions(self) -> list[ModelSession]:
        return [stage.session for stage in self._alone_stages or []]

    @property
    def session_sets(self) -> int:
        """Copies of the span's weights in memory: 2 with alone sessions."""
        return 2 if self._alone_stages is not None else 1

    @property
    def session_count(self) -> int:
        return len(self._stages)

    @property
    def device(self) -> str:
        return self._stages[0].session.device

    @property
    def input_name(self) -> str:
        """``input_ids`` (first span) or ``hidden.{L}``: the tensor a step's body carries."""
        return self._stages[0].input_name

    @property
    def output_name(self) -> str:
        """``logits`` (last span) or ``hidden.{L'}``, the next span's input."""
        return self._stages[-1].output_name

    def empty_kv(self) -> SequenceKV:
        shape = (1, self.kv_heads, 0, self.head_dim)
        keys = [np.zeros(shape, self.kv_dtype) for _ in range(self.layers)]
        values = [np.zeros(shape, self.kv_dtype) for _ in range(self.layers)]
        return SequenceKV(keys, values, 0)

    def step(
        self,
        kvs: list[SequenceKV],
        inputs: np.ndarray,
        new_tokens: list[int] | None = None,
        alone: bool = False,
    ) -> np.ndarray:
        """One step for a batch: inputs are input_ids [B, T] (first span) or hidden [B, T, H];
        row i's real new tokens are its last new_tokens[i] (left padding; None = all T); each
        row's past (kvs[i].length tokens, which may differ between rows) is left-padded to the
        longest for the run; afterwards each kvs[i] holds its real tokens only. Returns hidden
        [B, T, H] or, for the last span, logits [B, vocab]. ``alone``: on the alone sessions
        where the span has them (the same results, more threads)."""
        inputs = self._check_inputs(inputs)
        batch, tokens = int(inputs.shape[0]), int(inputs.shape[1])
        counts = self._check_rows(kvs, batch, tokens, new_tokens)
        whole = all(count == tokens for count in counts)
        kept = kvs[0].batch if whole and self.keep_batches else None
        rows: list[int] | None = None  # kvs[i] is row rows[i] of the kept batch
        if kept is not None and kept.holds_exactly(kvs):
            rows = [kv.row for kv in kvs]
            if rows != list(range(batch)):
                ordered = np.empty_like(inputs)
                ordered[rows] = inputs
                inputs, kvs = ordered, list(kept.members)
            else:
                rows = None
            past_len, pads = kept.width, kept.pads
            keys, values = kept.feeds()  # resident values as they are, without binding arrays
        else:
            past_len = max(kv.length for kv in kvs)
            pads = [past_len - kv.length for kv in kvs]
            if batch == 1 and whole and kvs[0].batch is None:
                keys, values = kvs[0].keys, kvs[0].values  # its own: fed as they are
            else:
                keys, values = gather_past(kvs, past_len, self.kv_dtype, self.kv_heads,
                                           self.head_dim, self.layers)  # fmt: skip
        lengths = [kv.length for kv in kvs]
        if batch == 1 and whole:
            mask = np.ones((1, past_len + tokens), np.int64)
            mask[0, : pads[0]] = 0
            positions = np.arange(lengths[0], lengths[0] + tokens, dtype=np.int64)[None, :]
        else:
            mask, positions = _padded_mask(lengths, counts, past_len, tokens)
        bound = whole and self.keep_batches and self.io_binding
        stages = self._alone_stages if alone and self._alone_stages else self._stages
        out, presents = self._run(stages, inputs, mask, positions, keys, values, bound)
        new_keys, new_values = presents
        if whole and self.keep_batches:
            attach_rows(kvs, new_keys, new_values, pads, [n + tokens for n in lengths],
                        resident=bound)  # fmt: skip
        elif batch == 1 and whole:
            kvs[0].replace(new_keys, new_values, lengths[0] + tokens)
        else:  # left-padded new tokens: each row's real ones cut out, into arrays of its own
            for row, kv in enumerate(kvs):
                kv.replace(
                    [_real_tokens(k, row, lengths[row], counts[row], past_len, tokens)
                     for k in new_keys],
                    [_real_tokens(v, row, lengths[row], counts[row], past_len, tokens)
                     for v in new_values],
                    lengths[row] + counts[row],
                )  # fmt: skip
        return out[rows] if rows is not None else out

    def _run(
        self,
        stages: list[_Stage],
        x: np.ndarray,
        mask: np.ndarray,
        positions: np.ndarray,
        keys: list[Any],
        values: list[Any],
        bound: bool = False,
    ) -> tuple[np.ndarray, tuple[list[Any], list[Any]]]:
        """The span's sessions in order; the presents per layer of the span (keys, values):
        numpy arrays, or with ``bound`` OrtValues left where the session put them (pasts may
        then be OrtValues of the last run too)."""
        new_keys: list[Any] = []
        new_values: list[Any] = []
        for stage in stages:
            feeds: dict[str, Any] = {stage.input_name: x}
            feeds.update(attention_mask=mask, position_ids=positions)
            names = [stage.output_name]
            for layer in stage.layers:
                index = layer - self.first_layer
                feeds[f"past.{layer}.key"] = keys[index]
                feeds[f"past.{layer}.value"] = values[index]
                names += [f"present.{layer}.key", f"present.{layer}.value"]
            try:
                if bound:
                    host, kept = stage.session.run_bound(feeds, names[:1], names[1:])
                    produced = [*host, *kept]
                else:
                    produced = stage.session.run(feeds, names)
            except Exception as exc:  # onnxruntime's errors are untyped
                past = feeds[f"past.{stage.layers[0]}.key"]
                past_shape = list(past.shape) if isinstance(past, np.ndarray) else past.shape()
                raise DecoderStepFailed(
                    f"{stage.session.source} failed on {stage.input_name} {list(x.shape)}, "
                    f"past {past_shape}: {exc}"
                ) from exc
            x = produced[0]
            new_keys += produced[1::2]
            new_values += produced[2::2]
        return x, (new_keys, new_values)

    def _check_inputs(self, inputs: np.ndarray) -> np.ndarray:
        if not isinstance(inputs, np.ndarray):
            raise InputMismatch(f"inputs must be a numpy array, got {type(inputs).__name__}")
        if self.is_first:
            if inputs.dtype.kind not in "iu":
                raise InputMismatch(
                    f"the first span takes input_ids of an integer dtype [batch, tokens], got "
                    f"{inputs.dtype}"
                )
            if inputs.ndim != 2 or 0 in inputs.shape:
                raise ShapeMismatch(
                    f"input_ids has shape {list(inputs.shape)}; expected [batch, tokens], both >= 1"
                )
            return inputs.astype(np.int64, copy=False)
        hidden = self.info.hidden_size
        if inputs.dtype != np.float32:
            raise InputMismatch(
                f"hidden.{self.first_layer} must be FP32 [batch, tokens, {hidden}], got "
                f"{inputs.dtype}"
            )
        if inputs.ndim != 3 or inputs.shape[2] != hidden or 0 in inputs.shape:
            raise ShapeMismatch(
                f"hidden.{self.first_layer} has shape {list(inputs.shape)}; expected "
                f"[batch, tokens, {hidden}] with batch, tokens >= 1"
            )
        return inputs

    def _check_rows(
        self, kvs: list[SequenceKV], batch: int, tokens: int, new_tokens: list[int] | None
    ) -> list[int]:
        if len(kvs) != batch:
            raise InvalidRequest(
                f"{len(kvs)} sequence KV(s) for a batch of {batch} rows; give one per row"
            )
        if len({id(kv) for kv in kvs}) != len(kvs):
            raise InvalidRequest("one sequence's KV appears twice in the batch; rows must differ")
        counts = [tokens] * batch if new_tokens is None else [int(n) for n in new_tokens]
        if len(counts) != batch or any(not 1 <= n <= tokens for n in counts):
            raise InvalidRequest(
                f"new_tokens {new_tokens!r} must give, for each of the {batch} rows, its real "
                f"new tokens: 1..{tokens} (the row's last ones; the rest is left padding)"
            )
        want = (1, self.kv_heads, None, self.head_dim)
        for row, kv in enumerate(kvs):
            if kv.length + counts[row] > self.info.context_length:
                raise ContextOverflow(
                    f"row {row} would hold {kv.length + counts[row]} tokens; the model's "
                    f"context length is {self.info.context_length}"
                )
            if kv.batch is not None:
                continue  # a row of this span's presents: their shapes are the graph's
            if len(kv.keys) != self.layers or len(kv.values) != self.layers:
                raise InvalidRequest(
                    f"row {row}'s KV holds {len(kv.keys)} key and {len(kv.values)} value "
                    f"layer(s); this span has {self.layers} (use empty_kv())"
                )
            for array in (*kv.keys, *kv.values):
                if array.dtype != self.kv_dtype:
                    raise InputMismatch(
                        f"row {row}'s KV holds {array.dtype} arrays; this span keeps "
                        f"{np.dtype(self.kv_dtype)} (use empty_kv())"
                    )
                shape = array.shape
                if (
                    len(shape) != 4
                    or (shape[0], shape[1], shape[3]) != (1, self.kv_heads, self.head_dim)
                    or shape[2] != kv.length
                ):
                    raise ShapeMismatch(
                        f"row {row}'s KV has an array of shape {list(shape)}; expected "
                        f"{[d if d is not None else kv.length for d in want]}"
                    )
        return counts


def _padded_mask(
    lengths: list[int], counts: list[int], past_len: int, tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row i: [pad | its past | pad | its new tokens]; positions continue each row's past."""
    batch = len(lengths)
    mask = np.zeros((batch, past_len + tokens), np.int64)
    positions = np.ones((batch, tokens), np.int64)  # padding positions are masked: any value
    for row, (length, count) in enumerate(zip(lengths, counts, strict=True)):
        mask[row, past_len - length : past_len] = 1
        mask[row, past_len + tokens - count :] = 1
        positions[row, tokens - count :] = np.arange(length, length + count)
    return mask, positions


def _real_tokens(
    present: np.ndarray, row: int, length: int, count: int, past_len: int, tokens: int
) -> np.ndarray:
    """Row ``row``'s real tokens of a batch ``present`` as its own [1, heads, n, dim] array."""
    old = present[row : row + 1, :, past_len - length : past_len]
    new = present[row : row + 1, :, past_len + tokens - count :]
    return np.concatenate((old, new), axis=2)


def _stage(session: ModelSession) -> _Stage:
    names = [spec.name for spec in session.signature.inputs]
    outputs = session.signature.output_names()
    layers = [int(m.group(1)) for n in names if (m := _PAST.fullmatch(n))]
    main_in = [n for n in names if n == INPUT_IDS or _HIDDEN.fullmatch(n)]
    main_out = [n for n in outputs if n == LOGITS or _HIDDEN.fullmatch(n)]
    if len(main_in) != 1 or len(main_out) != 1 or not layers:
        raise ModelLoadError(
            f"{session.source} is not a generation segment: it takes {', '.join(names)} and "
            f"gives {', '.join(outputs)}; expected input_ids or hidden.L, attention_mask, "
            "position_ids, past.l.key/value -> hidden.L' or logits, present.l.key/value"
        )
    return _Stage(session, main_in[0], main_out[0], layers)
