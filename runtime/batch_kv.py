"""A sequence's KV for one span, and the batch KV that decode steps keep from one run to the next.

A batched decode step feeds onnxruntime one past per layer for all its rows, [B, kv_heads, P,
head_dim], each row left-padded to the longest, and gets back the presents [B, kv_heads, P + T,
head_dim]: the pasts with the new tokens appended, the padding where it was. When the next step
has the same rows (continuous batching mostly does: a span's sequences step together until one
finishes or another joins), those presents are its pasts as they are, whatever the rows' order:
no copy besides the graph's own concatenation. Gathering every row's past into fresh padded
arrays and cutting each row's tokens back out cost a third of a 16-row SmolLM2 step (33 + 12 ms of
187 ms, ``runtime/decoder.py`` before this module).

So a row's KV stays a view into its batch's arrays (a ``SequenceKV`` attached to a ``BatchKV``)
until a step with other rows needs it elsewhere: then it is gathered once, as every step did
before. onnxruntime's outputs are never written to, so a view stays what it was when taken; a
row left behind by a batch that moves on is copied out (``detach``), so an old batch's arrays
never outlive the step that replaced them for the sake of one row.

With IO binding (``DecoderSpan.io_binding``, on where the sessions got CUDA) a batch's presents
are onnxruntime values in the session's device memory (``resident``), bound as the next run's
pasts as they are: the KV does not cross to the host between steps. Host copies of a batch are
made once, and only when a row's tokens are needed elsewhere (a gather, a row left behind, a
prefix block, a truncation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# an onnxruntime OrtValue's element type -> bytes (the KV dtypes a package may declare)
_ELEMENT_BYTES = {"tensor(float)": 4, "tensor(float16)": 2}


class BatchKV:
    """The presents of a batch's last run: per layer [B, kv_heads, width, head_dim]; row r's
    tokens are its last ``width - pads[r]``. Either numpy arrays, or onnxruntime values kept
    where the session put them (``resident``), copied to the host only when read."""

    __slots__ = ("_host", "resident", "members", "pads", "bytes_per_token")

    def __init__(
        self,
        keys: list[Any],
        values: list[Any],
        members: list[SequenceKV],
        pads: list[int],
        *,
        resident: bool = False,
    ) -> None:
        # swapped as one: a reader never sees keys of one run and values of another
        self._host: tuple[list[np.ndarray], list[np.ndarray]] | None = None
        self.resident: tuple[list[Any], list[Any]] | None = None
        if resident:
            self.resident = (keys, values)
            self.bytes_per_token = sum(
                v.shape()[1] * v.shape()[3] * _ELEMENT_BYTES[v.data_type()]
                for v in (*keys, *values)
            )
        else:
            self._host = (keys, values)
            self.bytes_per_token = sum(
                a.shape[1] * a.shape[3] * a.itemsize for a in (*keys, *values)
            )
        self.members = members  # row r's sequence
        self.pads = pads

    @property
    def arrays(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The presents as numpy arrays: resident ones are copied to the host on the first read
        (never written to afterwards, so the copy stays true)."""
        host = self._host
        if host is None:
            assert self.resident is not None
            keys, values = self.resident
            host = ([k.numpy() for k in keys], [v.numpy() for v in values])
            self._host = host
        return host

    def feeds(self) -> tuple[list[Any], list[Any]]:
        """What the next run of the same rows takes as its pasts: the resident values as they
        are, else the host arrays."""
        return self.resident if self.resident is not None else self.arrays

    @property
    def width(self) -> int:
        if self.resident is not None:
            return int(self.resident[0][0].shape()[2])
        return int(self.arrays[0][0].shape[2])

    def holds_exactly(self, kvs: Sequence[SequenceKV]) -> bool:
        """True when ``kvs`` are this batch's rows, in any order, each still attached."""
        return len(kvs) == len(self.members) and all(kv.batch is self for kv in kvs)


class SequenceKV:
    """One sequence's KV for one span's layers: arrays of its own, or a row of a ``BatchKV``."""

    __slots__ = ("_own", "_at", "length", "released")

    def __init__(self, keys: list[np.ndarray], values: list[np.ndarray], length: int) -> None:
        self._own: tuple[list[np.ndarray], list[np.ndarray]] | None = (list(keys), list(values))
        self._at: tuple[BatchKV, int] | None = None
        self.length = length  # tokens held == the next position
        self.released = False

    @property
    def batch(self) -> BatchKV | None:
        at = self._at
        return at[0] if at is not None else None

    @property
    def row(self) -> int:
        at = self._at
        return at[1] if at is not None else -1

    @property
    def keys(self) -> list[np.ndarray]:
        """Per layer [1, kv_heads, length, head_dim] (views into the batch when attached)."""
        return self._arrays()[0]

    @property
    def values(self) -> list[np.ndarray]:
        return self._arrays()[1]

    def _arrays(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        at = self._at
        if at is None:
            assert self._own is not None
            return self._own
        batch, row = at
        pad, (keys, values) = batch.pads[row], batch.arrays
        cut = (slice(row, row + 1), slice(None), slice(pad, None))
        return [k[cut] for k in keys], [v[cut] for v in values]

    def nbytes(self) -> int:
        at = self._at
        if at is not None:  # from the batch's shapes: no host copy of a resident batch
            return at[0].bytes_per_token * self.length
        keys, values = self._arrays()
        return sum(int(a.nbytes) for a in keys) + sum(int(a.nbytes) for a in values)

    def replace(self, keys: list[np.ndarray], values: list[np.ndarray], length: int) -> None:
        """Hold these arrays of its own from now on (leaving any batch)."""
        self._own = (list(keys), list(values))
        self._at = None
        self.length = length

    def attach(self, batch: BatchKV, row: int, length: int) -> None:
        self._at = (batch, row)
        self._own = None
        self.length = length

    def detach(self) -> None:
        """Copy its tokens out of its batch, which can then go (nothing, once released)."""
        if self._at is None:
            return
        if self.released:
            self._own, self._at = ([], []), None
            return
        keys, values = self._arrays()
        self._own = ([np.ascontiguousarray(a) for a in keys],
                     [np.ascontiguousarray(a) for a in values])  # fmt: skip
        self._at = None

    def release(self) -> None:
        """The sequence is closed: a batch that still lists it need not copy it out."""
        self.released = True


def attach_rows(
    kvs: list[SequenceKV],
    keys: list[Any],
    values: list[Any],
    pads: list[int],
    lengths: list[int],
    *,
    resident: bool = False,
) -> BatchKV:
    """Make ``kvs`` the rows of a new batch over these presents (onnxruntime values when
    ``resident``); rows of the batches they left that are not among them are copied out of
    those."""
    left = {id(b): b for kv in kvs if (b := kv.batch) is not None}
    batch = BatchKV(keys, values, list(kvs), pads, resident=resident)
    for row, (kv, length) in enumerate(zip(kvs, lengths, strict=True)):
        kv.attach(batch, row, length)
    for old in left.values():
        for member in old.members:
            if member.batch is old:
                member.detach()
    return batch


def gather_past(
    kvs: list[SequenceKV], past_len: int, dtype: type, kv_heads: int, head_dim: int, layers: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every row's past left-padded to ``past_len``: per layer [B, kv_heads, past_len, head_dim]."""
    shape = (len(kvs), kv_heads, past_len, head_dim)
    sources = [kv._arrays() for kv in kvs]  # once per row: attached rows build views
    out: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for part in (0, 1):
        for layer in range(layers):
            padded: np.ndarray = np.zeros(shape, dtype)
            for row, kv in enumerate(kvs):
                if kv.length:
                    padded[row, :, past_len - kv.length :] = sources[row][part][layer][0]
            out[part].append(padded)
    return out
