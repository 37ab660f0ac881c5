"""Malformed requests of every kind, each followed by a good one, from concurrent clients to a
live coordinator (bench/faults/inputs.py): each gets its documented 4xx with a JSON error, no
5xx, every good request a correct 200, and both processes stay up."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.faults.inputs import bad_input_flood, bad_inputs

pytestmark = pytest.mark.slow


def test_bad_input_gets_its_4xx_and_good_requests_among_it_are_served(tmp_path: Path) -> None:
    *bad, good = bad_input_flood(tmp_path, per_kind=10, concurrency=8)
    assert len(bad) == len(bad_inputs())
    for record in bad:
        assert record.sent == 10 and record.failed == 0, (record.fault, record.details)
        assert record.status_4xx == 10 and record.status_5xx == 0
    assert good.sent == 10 * len(bad) and good.failed == 0 and good.status_5xx == 0
    assert good.details["processes_alive"]
