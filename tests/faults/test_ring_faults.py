"""Faults of the ring's processes, against real coordinator and node processes (loopback,
bounded): each test runs one scenario of bench/faults/ring.py with a small load and asserts its
counts (python -m bench.faults runs the same with larger loads into docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.faults.common import FaultRecord
from tests.support.faults.ring import (
    coordinator_kill_with_jobs,
    internal_calls_unsigned_or_replayed,
    node_hang,
    node_kill,
    node_other_version_never_routed,
    node_restarted_with_other_version,
)

pytestmark = pytest.mark.slow


def assert_no_failures(record: FaultRecord) -> None:
    assert record.failed == 0 and record.status_500 == 0, (record.outcome, record.details)


def test_kill_9_under_load_loses_nothing_and_a_restarted_node_takes_load_again(
    tmp_path: Path,
) -> None:
    record = node_kill(tmp_path, requests=1000, concurrency=16)
    assert_no_failures(record)
    assert record.sent == 1200 and record.status_5xx == 0
    assert record.details["ejections"] >= 1
    assert record.details["restarted_node_runs"] > 0  # back in its span, taking load


def test_a_hung_node_is_failed_over_within_the_deadline(tmp_path: Path) -> None:
    record = node_hang(tmp_path, requests=300, concurrency=8, deadline_s=5.0)
    assert_no_failures(record)
    assert record.sent == 300 and record.status_5xx == 0
    assert record.details["max_latency_s"] < 5.0  # failed over inside each request's deadline


def test_a_node_with_another_version_is_never_in_a_route(tmp_path: Path) -> None:
    record = node_other_version_never_routed(tmp_path, requests=100, after_kill=10)
    assert record.details["other_digest"] != record.details["digest"]
    assert_no_failures(record)  # every answer from the good node's bytes
    # once the good node is gone: 503 naming the missing replica, never the other bytes
    assert record.details["refused"] == {503: 10} and record.sent == 110


def test_a_node_restarted_with_another_version_is_out_of_routes_until_consistent(
    tmp_path: Path,
) -> None:
    record = node_restarted_with_other_version(tmp_path, requests=4000, concurrency=8)
    assert_no_failures(record)
    assert record.status_5xx == 0 and record.details["wrong_answers"] == 0
    assert record.details["restarted_node_runs"] > 0  # consistent again, and taking load


def test_a_coordinator_killed_with_queued_jobs_loses_none_and_keeps_its_placement(
    tmp_path: Path,
) -> None:
    record = coordinator_kill_with_jobs(tmp_path, jobs=100)
    assert_no_failures(record)
    assert record.jobs_accepted == 100 and record.jobs_lost == 0
    assert record.details["resumed"] == 60  # all queued at the kill (their first node paused)
    assert record.details["placement_kept"]


def test_unsigned_forged_and_replayed_internal_calls_are_refused(tmp_path: Path) -> None:
    unsigned, replayed = internal_calls_unsigned_or_replayed(tmp_path, per_kind=5, replay_s=4.5)
    assert_no_failures(unsigned)
    assert unsigned.status_4xx == unsigned.sent == 15
    assert_no_failures(replayed)  # the first send accepted, every replay refused
    assert replayed.sent > 10 and not replayed.details["dead_node_healthy_after"]
