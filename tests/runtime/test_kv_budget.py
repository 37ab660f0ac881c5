"""The node's KV budget: admission, LRU eviction of idle sequences only, TTL expiry."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from runtime.errors import (
    InvalidRequest,
    KvBudgetExhausted,
    KvReservationExceeded,
    KvReservationTooLarge,
    Overloaded,
    UnknownSequence,
)
from runtime.kv_budget import KvBudget, KvStats, SequenceUsage

TTL = 10.0


def test_reserve_touch_idle_release_account_every_byte() -> None:
    budget = KvBudget(1000, TTL)
    assert budget.reserve("a", 600, now=0.0) == []
    budget.touch("a", 150, now=1.0)
    assert budget.stats() == KvStats(600, 150, 1, 0) and budget.free_bytes() == 400
    budget.mark_idle("a", now=2.0)  # finished: only the KV it used stays reserved
    assert budget.usage("a") == SequenceUsage(150, 150, False, 2.0)
    assert budget.stats() == KvStats(150, 150, 0, 1)
    assert budget.release("a") == 150 and budget.release("a") == 0  # idempotent
    assert budget.stats() == KvStats(0, 0, 0, 0) and "a" not in budget


def test_a_full_budget_refuses_with_the_figures_and_changes_nothing() -> None:
    budget = KvBudget(1000, TTL, retry_after_s=2.5)
    budget.reserve("live", 700, now=0.0)
    budget.reserve("idle", 200, now=0.0)
    budget.mark_idle("idle", now=0.5)  # used nothing: reservation shrinks to 0
    budget.reserve("idle2", 100, now=1.0)
    budget.touch("idle2", 100, now=1.0)
    budget.mark_idle("idle2", now=1.0)
    before = {sid: budget.usage(sid) for sid in ("live", "idle", "idle2")}
    with pytest.raises(KvBudgetExhausted) as caught:
        budget.reserve("new", 500, now=2.0)
    message = str(caught.value)
    assert "asks 500 bytes" in message and "200 are free" in message
    assert "+100 held by idle" in message and "capacity of 1000" in message
    assert isinstance(caught.value, Overloaded) and caught.value.retry_after_s == 2.5
    assert {sid: budget.usage(sid) for sid in before} == before  # no pointless eviction


def test_more_than_the_whole_capacity_is_a_distinct_error_never_retry() -> None:
    budget = KvBudget(1000, TTL)
    with pytest.raises(KvReservationTooLarge, match="capacity of 1000 bytes: it can never fit"):
        budget.reserve("huge", 1001, now=0.0)
    with pytest.raises(KvReservationTooLarge) as caught:
        budget.reserve("huge", 10**9, now=0.0)
    assert isinstance(caught.value, InvalidRequest) and not isinstance(caught.value, Overloaded)
    assert budget.reserve("exact", 1000, now=0.0) == []


def test_idle_sequences_are_evicted_least_recently_used_first_live_ones_never() -> None:
    budget = KvBudget(1000, TTL)
    for i, sid in enumerate(["old", "mid", "new"]):
        budget.reserve(sid, 200, now=float(i))
        budget.touch(sid, 200, now=float(i))
        budget.mark_idle(sid, now=float(i))
    budget.reserve("live", 400, now=3.0)
    assert budget.reserve("next", 350, now=4.0) == ["old", "mid"]  # 0 free + 200 + 200
    assert "new" in budget and "live" in budget
    with pytest.raises(KvBudgetExhausted):
        budget.reserve("more", 450, now=5.0)  # only "new" (200) is evictable, live ones not
    assert "live" in budget and "next" in budget and "new" in budget


def test_a_live_sequence_without_a_step_for_the_ttl_becomes_evictable() -> None:
    budget = KvBudget(1000, TTL)
    budget.reserve("abandoned", 800, now=0.0)
    budget.reserve("active", 200, now=0.0)
    budget.touch("active", 10, now=9.0)
    with pytest.raises(KvBudgetExhausted):
        budget.reserve("new", 500, now=9.9)
    assert budget.reserve("new", 500, now=10.0) == ["abandoned"]
    assert "active" in budget


def test_expire_frees_what_had_no_step_for_the_ttl() -> None:
    budget = KvBudget(1000, TTL)
    budget.reserve("idle", 100, now=0.0)
    budget.mark_idle("idle", now=1.0)
    budget.reserve("abandoned", 100, now=0.0)
    budget.reserve("stepping", 100, now=0.0)
    budget.touch("stepping", 50, now=5.0)
    assert budget.expire(now=9.0) == []
    assert sorted(budget.expire(now=10.5)) == ["abandoned"]
    assert budget.expire(now=11.0) == ["idle"]
    assert budget.expire(now=15.0) == ["stepping"]
    assert budget.stats() == KvStats(0, 0, 0, 0)


def test_a_new_turn_reuses_its_own_bytes_and_goes_live_again() -> None:
    budget = KvBudget(1000, TTL)
    budget.reserve("chat", 900, now=0.0)
    budget.touch("chat", 300, now=1.0)
    budget.mark_idle("chat", now=2.0)
    assert budget.reserve("chat", 1000, now=3.0) == []  # its 300 count as its own
    assert budget.usage("chat") == SequenceUsage(1000, 300, True, 3.0)


def test_steps_check_their_sequence_and_reservation() -> None:
    budget = KvBudget(1000, TTL)
    with pytest.raises(UnknownSequence, match="'ghost' holds no KV reservation"):
        budget.touch("ghost", 1, now=0.0)
    with pytest.raises(UnknownSequence):
        budget.mark_idle("ghost", now=0.0)
    budget.reserve("s", 100, now=0.0)
    with pytest.raises(KvReservationExceeded, match="holds 101 bytes .* reservation of 100"):
        budget.touch("s", 101, now=1.0)
    assert budget.usage("s") == SequenceUsage(100, 0, True, 0.0)
    with pytest.raises(ValueError, match="nbytes"):
        budget.reserve("s", -1, now=0.0)
    with pytest.raises(ValueError, match="idle_ttl_s"):
        KvBudget(10, 0.0)


IDS = st.sampled_from(["a", "b", "c", "d", "e", "f"])
CAPACITY = 1000


class BudgetMachine(RuleBasedStateMachine):
    """Random operations against a plain model of what must hold after each."""

    def __init__(self) -> None:
        super().__init__()
        self.budget = KvBudget(CAPACITY, TTL)
        self.model: dict[str, SequenceUsage] = {}
        self.now = 0.0

    def live(self, sid: str) -> bool:
        u = self.model[sid]
        return u.live and self.now - u.last_active < TTL

    @rule(dt=st.floats(0.0, 6.0))
    def wait(self, dt: float) -> None:
        self.now += dt

    @rule(sid=IDS, nbytes=st.integers(0, 400) | st.integers(0, CAPACITY + 200))
    def reserve(self, sid: str, nbytes: int) -> None:
        before = dict(self.model)
        try:
            evicted = self.budget.reserve(sid, nbytes, self.now)
        except KvReservationTooLarge:
            assert nbytes > CAPACITY
            return
        except KvBudgetExhausted:
            reclaimable = sum(
                u.reserved_bytes for s, u in before.items() if s != sid and not self.live(s)
            )
            own = before[sid].reserved_bytes if sid in before else 0
            free = CAPACITY - sum(u.reserved_bytes for u in before.values()) + own
            assert nbytes > free + reclaimable
            return
        for victim in evicted:
            assert victim != sid and not self.live(victim)  # live sequences are never evicted
            del self.model[victim]
        kept_idle = [s for s in self.model if s != sid and not self.live(s)]
        if evicted:  # least recently used first
            newest_evicted = max(before[v].last_active for v in evicted)
            assert all(before[s].last_active >= newest_evicted for s in kept_idle)
        used = min(before[sid].used_bytes, nbytes) if sid in before else 0
        self.model[sid] = SequenceUsage(nbytes, used, True, self.now)

    @rule(sid=IDS, fraction=st.floats(0.0, 1.0) | st.just(1.0))
    def touch(self, sid: str, fraction: float) -> None:
        if sid not in self.model:
            with pytest.raises(UnknownSequence):
                self.budget.touch(sid, 0, self.now)
            return
        used = int(self.model[sid].reserved_bytes * fraction)
        self.budget.touch(sid, used, self.now)
        self.model[sid] = SequenceUsage(self.model[sid].reserved_bytes, used, True, self.now)

    @rule(sid=IDS)
    def mark_idle(self, sid: str) -> None:
        if sid in self.model:
            self.budget.mark_idle(sid, self.now)
            used = self.model[sid].used_bytes
            self.model[sid] = SequenceUsage(used, used, False, self.now)

    @rule(sid=IDS)
    def release(self, sid: str) -> None:
        freed_before = self.budget.free_bytes()
        expected = self.model.pop(sid).reserved_bytes if sid in self.model else 0
        assert self.budget.release(sid) == expected  # exactly what was reserved
        assert self.budget.free_bytes() == freed_before + expected

    @rule()
    def expire(self) -> None:
        stale = {s for s, u in self.model.items() if self.now - u.last_active >= TTL}
        assert set(self.budget.expire(self.now)) == stale
        for sid in stale:
            del self.model[sid]

    @invariant()
    def matches_the_model(self) -> None:
        reserved = sum(u.reserved_bytes for u in self.model.values())
        assert reserved <= CAPACITY
        live = sum(1 for u in self.model.values() if u.live)
        used = sum(u.used_bytes for u in self.model.values())
        assert self.budget.stats() == KvStats(reserved, used, live, len(self.model) - live)
        assert {s: self.budget.usage(s) for s in self.model} == self.model
        assert len(self.budget) == len(self.model)


TestBudgetMachine = BudgetMachine.TestCase
TestBudgetMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
