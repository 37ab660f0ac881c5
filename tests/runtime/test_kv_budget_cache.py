"""Prefix-cache blocks in the KV budget: held apart from sequences, evicted least recently
used (never a protected one, never a live sequence), never expired."""

from __future__ import annotations

import pytest

from runtime.errors import KvBudgetExhausted
from runtime.kv_budget import KvBudget


def test_blocks_give_way_to_reservations_lru_and_never_expire() -> None:
    budget = KvBudget(100, idle_ttl_s=10)
    assert budget.keep("b0", 30, now=0.0) == [] and budget.keep("b1", 30, now=1.0) == []
    stats = budget.stats()
    assert (stats.reserved_bytes, stats.cached_bytes, stats.cached_blocks) == (0, 60, 2)
    assert stats.idle_sequences == 0
    budget.refresh("b0", now=2.0)  # b1 is now the least recently used
    assert budget.reserve("seq", 50, now=3.0) == ["b1"]
    assert budget.expire(now=100.0) == ["seq"]  # the block outlives the TTL
    assert "b0" in budget and budget.stats().cached_bytes == 30


def test_a_block_never_evicts_a_live_sequence_nor_a_protected_block() -> None:
    budget = KvBudget(100, idle_ttl_s=10)
    budget.reserve("live", 60, now=0.0)
    budget.keep("head", 30, now=0.0)
    with pytest.raises(KvBudgetExhausted):
        budget.keep("next", 30, now=1.0, protect=frozenset({"head"}))
    assert "head" in budget and "next" not in budget
    assert budget.keep("other", 30, now=1.0) == ["head"]  # unprotected: LRU goes
    assert budget.stats().live_sequences == 1 and budget.free_bytes() == 10
