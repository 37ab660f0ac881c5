"""Clients that misbehave at the connection level, and overload, against live coordinator and
node processes (``tests/support/faults/clients.py``, ``overload.py``; ``python -m
bench.faults`` runs them larger): every stalled phase is ended in time and counted, a flood of
incomplete connections neither starves a good client nor floods the log, and twice the
capacity is answered 503 + Retry-After fast while the admitted requests stay fast."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.faults.clients import connection_flood, slow_clients
from tests.support.faults.overload import overload

pytestmark = pytest.mark.slow
needs_prlimit = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")
MB = 1024 * 1024


def test_slow_headers_slow_bodies_and_unread_answers_are_ended_within_their_timeouts(
    tmp_path: Path,
) -> None:
    record = slow_clients(tmp_path, header_s=2.0, grace_s=2.0, write_s=3.0)
    ends = record.details["ended_after_s"]
    assert 1.8 <= ends["silent"] <= 3.0 and 1.8 <= ends["partial"] <= 3.0, ends
    assert 1.8 <= ends["body"] <= 3.0 and record.details["slow_body_answer"] == "HTTP/1.1 408"
    assert ends["never_reading"] >= 3.0 and not record.details["late"], record.details
    reasons = record.details["closed_by_reason"]
    assert reasons["header_timeout"] == 2 and reasons["body_too_slow"] == 1
    assert reasons["write_timeout"] == 1
    assert record.failed == 0 and record.details["good_answered"] >= 5


@needs_prlimit
def test_a_flood_of_incomplete_connections_under_a_low_limit_spares_good_clients(
    tmp_path: Path,
) -> None:
    record = connection_flood(tmp_path, 3000, 10.0, "1024:20000", max_connections=900)
    details = record.details
    assert details["descriptor_limit"] == 20000  # the soft limit was raised to the hard one
    assert details["cap"] == 900
    assert details["flood"]["most_held"] >= 2000  # the flood did happen
    assert record.failed == 0 and details["good_answered"] >= 5, details["good_failed"]
    assert details["good_max_s"] <= 5.0
    assert details["log_bytes"] < MB
    shed = {r: n for r, n in details["closed_by_reason"].items() if r.startswith("shed_")}
    assert sum(shed.values()) >= 1000, details["closed_by_reason"]
    assert details["accept_errors"] == 0 and details["coordinator_alive"]


@needs_prlimit
def test_a_cap_above_the_descriptor_limit_reaches_emfile_without_flooding_the_log(
    tmp_path: Path,
) -> None:
    record = connection_flood(tmp_path, 2000, 8.0, "1024:1024", max_connections=5000)
    details = record.details
    assert details["descriptor_limit"] == 1024 and details["cap"] == 5000
    assert details["accept_errors"] > 0  # it did run out of descriptors
    # and answered it by shedding, its accepts paused 0.1 s each time: when its first import
    # of the shedding module failed for want of a descriptor, it spun (214k failures in 20 s)
    assert details["accept_errors"] < 30 * 8.0, details["accept_errors"]
    assert sum(n for r, n in details["closed_by_reason"].items() if r.startswith("shed_")) > 0
    assert details["log_bytes"] < MB
    assert "Traceback" not in (tmp_path / "coordinator.log").read_text()
    assert details["coordinator_alive"]


def test_twice_the_capacity_is_refused_fast_and_the_admitted_stay_fast(tmp_path: Path) -> None:
    record = overload(tmp_path, overload_s=8.0, baseline_s=4.0, after_s=6.0, calibrate_s=3.0)
    details, over = record.details, record.details["overload"]
    assert over["statuses"].get("503", 0) > 0  # it was overloaded
    assert over["timed_out"] == 0 and over["no_answer"] == 0, over["statuses"]
    assert details["checks"]["retry_after"]
    # and not refused into idleness (0.8x in bench.faults)
    assert details["admitted_per_s"] >= 0.5 * details["capacity_per_s"], record.outcome
    assert details["rss_growth"] <= 0.10
    # bounds looser than bench.faults' aims (3x, 100 ms, 1.5x in 5 s): the suite shares its 2
    # cores; before admission, refused and admitted requests alike waited 2-10 s at 2x
    baseline = details["baseline_p99_ms"]
    assert float(over["refused_p99_ms"]) <= 500, record.outcome
    # (a full CI run once saw 776 ms here, where three runs of this test alone passed under
    # 500: the floor is 1 s; before admission control admitted requests waited 2-10 s)
    assert float(over["ok_p99_ms"]) <= max(10 * baseline, 1000), record.outcome
    assert float(details["after"]["ok_p99_ms"]) <= max(5 * baseline, 250), record.outcome
