"""intra_op_threads: -1 (auto) = the usable cores on CPU, 0 = onnxruntime's default, N = N,
read back from real sessions."""

from __future__ import annotations

import os

import pytest

from runtime.session import (
    AUTO_THREADS,
    SessionSettings,
    create_session,
    intra_op_threads_for,
    usable_cores,
)
from tests.models import dense_model


def threads_of(settings: SessionSettings) -> int:
    session = create_session(dense_model().SerializeToString(), settings)
    return session.session.get_session_options().intra_op_num_threads


def test_usable_cores_is_the_affinity_mask() -> None:
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_auto_takes_the_usable_cores_on_cpu_and_stays_onnxruntimes_default_on_cuda() -> None:
    auto = SessionSettings(device="cpu")
    assert auto.intra_op_threads == AUTO_THREADS
    assert intra_op_threads_for(auto, cuda=False) == usable_cores()
    assert intra_op_threads_for(auto, cuda=True) == 0
    assert threads_of(auto) == usable_cores()


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_explicit_counts_and_zero_reach_onnxruntime_unchanged(threads: int) -> None:
    settings = SessionSettings(device="cpu", intra_op_threads=threads)
    assert intra_op_threads_for(settings, cuda=False) == threads
    assert intra_op_threads_for(settings, cuda=True) == threads
    assert threads_of(settings) == threads


def test_auto_follows_a_narrower_affinity_mask() -> None:
    """A process pinned to one core (taskset, a cgroup's cpuset) still gets one thread."""
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert usable_cores() == 1
        assert intra_op_threads_for(SessionSettings(device="cpu"), cuda=False) == 1
    finally:
        os.sched_setaffinity(0, before)


def test_auto_shares_the_cores_among_the_runs_in_flight() -> None:
    cores = usable_cores()
    for runs in (1, 2, 4):
        settings = SessionSettings(device="cpu", concurrent_runs=runs)
        assert intra_op_threads_for(settings, cuda=False) == max(1, cores // runs)
    explicit = SessionSettings(device="cpu", intra_op_threads=2, concurrent_runs=4)
    assert intra_op_threads_for(explicit, cuda=False) == 2  # a count given is kept
