"""Prefix-aware routing: a new sequence goes to the replicas that hold the longest cached prefix
of its prompt, so a repeated system prompt costs only its new tokens (as llm-d and Dynamo route).

Nodes report, per generation span, the names of their most recent prefix blocks (heartbeat
``decoder_spans``: ``prefix_block_tokens`` and ``prefix_blocks``, ``runtime.prefix_cache``).
The coordinator names the prompt's blocks the same way and counts, per replica, how many of
them it holds from the first on; the chain starts where all its spans can (the smallest cached
prefix along it), and ``chain_choice`` prefers the chain with the most, then the least loaded
and lowest-latency one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.prefix_cache import block_hashes


@dataclass(frozen=True)
class HeldBlocks:
    """What one replica of one span holds: its block size and block names."""

    block_tokens: int
    names: frozenset[str]


def held_blocks(
    load: Mapping[str, Any], model: str, digest: str
) -> dict[tuple[int, int], HeldBlocks]:
    """The prefix blocks a node's heartbeat ``load`` reports, by span (first, last)."""
    held: dict[tuple[int, int], HeldBlocks] = {}
    for span in load.get("decoder_spans") or []:
        if not isinstance(span, dict) or span.get("model") != model or span.get("digest") != digest:
            continue
        tokens, names = span.get("prefix_block_tokens"), span.get("prefix_blocks")
        if isinstance(tokens, int) and tokens > 0 and isinstance(names, list):
            key = (int(span.get("first", -1)), int(span.get("last", -1)))
            held[key] = HeldBlocks(tokens, frozenset(n for n in names if isinstance(n, str)))
    return held


def cached_prefix(prompt: Sequence[int], held: HeldBlocks | None) -> int:
    """Tokens of ``prompt`` a replica holding ``held`` can start from."""
    if held is None or not held.names:
        return 0
    count = 0
    for name in block_hashes(prompt, held.block_tokens):
        if name not in held.names:
            break
        count += 1
    return count * held.block_tokens
