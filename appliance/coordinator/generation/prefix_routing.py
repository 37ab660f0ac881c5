"""Prefix-aware routing: a new sequence goes to the replicas that hold the longest cached prefix
of its prompt, so a repeated system prompt costs only its new tokens (as llm-d and Dynamo route).

Nodes report, per generation span, the names of their most recent prefix blocks (heartbeat
``decoder_spans``: ``prefix_block_tokens`` and ``prefix_blocks``, ``runtime.prefix_cache``).
The coordinator names the prompt's blocks the same way and, span by span, prefers the replica
holding most of them from the first on; since the chain starts where all its spans can (the
smallest cached prefix along it), the best replica per span gives the best chain. Ties, and
spans where no replica holds anything, go to the least loaded replica as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from runtime.prefix_cache import block_hashes

U = TypeVar("U", bound=str)  # a replica's URL


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


def prefer_cached(
    replicas: Sequence[U],
    prompt: Sequence[int],
    holdings: Mapping[U, HeldBlocks | None],
    load: Mapping[U, int],
) -> list[U]:
    """``replicas`` best first: the longest cached prefix of ``prompt``, then the least load."""
    return sorted(replicas, key=lambda u: (-cached_prefix(prompt, holdings.get(u)), load.get(u, 0)))
