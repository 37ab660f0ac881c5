"""Faults of the disk: the result cache's map full or folder removed, a tampered segment file, a
full disk during export. Each test runs one scenario of bench/faults/storage.py with a small load
against real processes (loopback, bounded) and asserts its counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.faults.storage import (
    cache_dir_removed,
    cache_map_full,
    export_disk_full,
    export_disk_full_tmpfs,
    segment_sha256_mismatch,
)

pytestmark = pytest.mark.slow


def test_a_full_cache_map_turns_the_cache_off_and_every_request_is_answered(
    tmp_path: Path,
) -> None:
    record = cache_map_full(tmp_path, requests=400, concurrency=8, map_bytes=1 << 20)
    assert record.failed == 0 and record.status_5xx == 0 and record.sent == 400
    assert record.details["degraded"] == 1 and record.details["map_full_logged"]
    assert record.details["cache"]["hit"] > 0  # it served hits until the map filled


def test_a_removed_cache_folder_fails_no_request_and_comes_back_at_restart(
    tmp_path: Path,
) -> None:
    record = cache_dir_removed(tmp_path, requests=600, concurrency=8)
    assert record.failed == 0 and record.status_5xx == 0 and record.sent == 640
    assert record.details["recreated"] and record.details["after_restart"]["hit"] > 0


def test_a_segment_that_does_not_match_its_manifest_is_refused_naming_the_file(
    tmp_path: Path,
) -> None:
    record = segment_sha256_mismatch(tmp_path, requests=300, concurrency=8)
    # the healthy model served all 300; the load was refused; the tampered model never served
    assert record.failed == 0 and record.status_500 == 0, record.details
    assert record.details["load_status"] == 400  # permanent: not a 503 to retry
    assert "segment-1.onnx" in record.details["load_error"]
    assert record.details["tampered"] == {503: 10}


def test_a_full_disk_during_export_leaves_no_half_package(tmp_path: Path) -> None:
    record = export_disk_full(tmp_path, attempts=2)
    outcomes = record.details["outcomes"]
    assert record.sent == len(outcomes) == 6 and record.failed == 0
    assert all(o["error"] and o["left"] == [] for o in outcomes), outcomes
    assert any(o["in_writer"] for o in outcomes)  # some failed inside the package writer


def test_a_full_tmpfs_during_export_leaves_no_half_package(tmp_path: Path) -> None:
    record = export_disk_full_tmpfs(tmp_path, attempts=3)
    if record.outcome.startswith("not run"):
        pytest.skip(record.outcome)  # mounting a tmpfs needs root and CAP_SYS_ADMIN
    outcomes = record.details["outcomes"]
    assert record.failed == 0, outcomes
    assert any(o["error"] and o["in_writer"] for o in outcomes)
    assert any(not o["error"] for o in outcomes)  # the bisection found a size that fits
