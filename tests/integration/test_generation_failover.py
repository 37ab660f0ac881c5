"""A node dying or hanging mid-answer costs no token (``tests/support/faults/generation.py``):
SmolLM2 in 2 spans x 2 replicas on four real node processes, 8 greedy streams at once; a node
holding live sequences killed (SIGKILL), then one of the other span frozen (SIGSTOP, caught by
step_timeout_s). Every stream completes with no error and the undisturbed run's tokens, up to a
fp32 near-tie; the coordinator's log names each rebuilt chain."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.faults.generation import generation_failover

pytestmark = pytest.mark.slow
STEP_TIMEOUT_S = 2.0


def test_a_node_killed_or_frozen_mid_stream_costs_no_token(tmp_path: Path) -> None:
    killed, frozen = generation_failover(tmp_path, 8, 24, STEP_TIMEOUT_S)
    for record in (killed, frozen):
        print(f"{record.fault}: {record.outcome} ({record.seconds} s)")
        assert record.sent == 8 and record.failed == 0, record
        assert record.details["replays"] >= 1, record
    # the frozen node is caught by the step timeout, long before the request's deadline
    assert frozen.details["largest_gap_s"] < STEP_TIMEOUT_S + 30, frozen
    assert "chain rebuilt without" in (tmp_path / "coordinator.log").read_text()


def test_the_one_process_mode_loses_no_token_to_a_killed_or_frozen_peer(tmp_path: Path) -> None:
    """The same faults with the coordinator as ``appliance serve --in-process-node``: its own
    node holds a replica of the first span and is called as a function, the other three are
    processes; the kill takes local-0's fellow replica, the freeze a node of the other span."""
    killed, frozen = generation_failover(tmp_path, 8, 24, STEP_TIMEOUT_S, in_process=True)
    for record in (killed, frozen):
        print(f"{record.fault}: {record.outcome} ({record.seconds} s)")
        assert record.sent == 8 and record.failed == 0, record
        assert record.details["replays"] >= 1, record
    assert frozen.details["largest_gap_s"] < STEP_TIMEOUT_S + 30, frozen
    log = (tmp_path / "coordinator.log").read_text()
    assert "node local-0 runs in this process" in log, log[-3000:]
    assert killed.details["in_process_calls"] > 0, "no call to local-0 was a function call"
