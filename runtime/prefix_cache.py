"""Prefix reuse: a span's KV of recent prompt prefixes, in blocks of tokens.

A prompt's ids are cut into blocks of ``block_tokens``; block i is named by a hash chained over
every id up to its end (``block_hashes``), so one name stands for one whole prefix and equal
names mean equal prefixes. A span keeps the KV of the blocks its sequences' prompts filled; a
new sequence whose prompt starts with cached blocks starts from a copy of their KV and computes
only the rest. Each span keeps its own blocks (later spans see hidden states, not ids, so every
span of a chain is told the ids at open). The bytes are accounted in the node's ``KvBudget`` as
cache entries: evicted least recently used for any reservation, never a live sequence's KV.

The names are public: heartbeats report the most recent ones, and a router that hashes a
prompt the same way finds the replica chain holding its longest prefix.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.decoder import SequenceKV

HASH_CHARS = 32  # hex characters of a block's name (128 bits)


def block_hashes(ids: Sequence[int], block_tokens: int) -> list[str]:
    """The names of the whole blocks of ``ids``: block i's is the hex SHA-256 of block i-1's
    name (ASCII; nothing for block 0) followed by the block's ids as little-endian int64,
    cut to HASH_CHARS characters."""
    names: list[str] = []
    previous = b""
    for start in range(0, len(ids) - block_tokens + 1, block_tokens):
        chunk = np.asarray(ids[start : start + block_tokens], dtype="<i8").tobytes()
        name = hashlib.sha256(previous + chunk).hexdigest()[:HASH_CHARS]
        names.append(name)
        previous = name.encode("ascii")
    return names


@dataclass
class _Block:
    keys: list[np.ndarray]  # per layer [1, kv_heads, block_tokens, head_dim]
    values: list[np.ndarray]

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (*self.keys, *self.values))


class PrefixCache:
    """The blocks of one span, most recently used last. Bookkeeping of bytes is the caller's
    (the budget); this holds the arrays and answers lookups."""

    def __init__(self, block_tokens: int = 32, recent: int = 256) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be at least 1, got {block_tokens}")
        self.block_tokens = block_tokens
        self.recent_limit = recent
        self._blocks: OrderedDict[str, _Block] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, name: object) -> bool:
        return name in self._blocks

    def matched(self, names: list[str]) -> int:
        """How many of ``names`` (a prompt's blocks, in order) are held from the first on."""
        count = 0
        for name in names:
            if name not in self._blocks:
                break
            count += 1
        return count

    def assemble(self, names: list[str], length: int) -> SequenceKV:
        """A new sequence's KV: the first ``length`` tokens of the blocks ``names`` (all held,
        as ``matched`` said), copied; the blocks become the most recently used."""
        blocks = [self._blocks[name] for name in names]
        for name in names:
            self._blocks.move_to_end(name)
        layers = len(blocks[0].keys)
        keys = [
            np.concatenate([b.keys[i] for b in blocks], axis=2)[:, :, :length]
            for i in range(layers)
        ]
        values = [
            np.concatenate([b.values[i] for b in blocks], axis=2)[:, :, :length]
            for i in range(layers)
        ]
        return SequenceKV([np.ascontiguousarray(k) for k in keys],
                          [np.ascontiguousarray(v) for v in values], length)  # fmt: skip

    def block_of(self, kv: SequenceKV, index: int) -> _Block:
        """Block ``index`` of a sequence's KV, copied (the sequence's arrays are replaced at
        each step; a view would pin the whole of them)."""
        start, end = index * self.block_tokens, (index + 1) * self.block_tokens
        return _Block([k[:, :, start:end].copy() for k in kv.keys],
                      [v[:, :, start:end].copy() for v in kv.values])  # fmt: skip

    def put(self, name: str, block: _Block) -> None:
        self._blocks[name] = block
        self._blocks.move_to_end(name)

    def drop(self, name: str) -> bool:
        return self._blocks.pop(name, None) is not None

    def names(self) -> list[str]:
        return list(self._blocks)

    def recent(self) -> list[str]:
        """The most recently used block names, newest first (bounded, for heartbeats)."""
        out: list[str] = []
        for name in reversed(self._blocks):
            if len(out) >= self.recent_limit:
                break
            out.append(name)
        return out
