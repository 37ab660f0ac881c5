"""Faults of the disk: the result cache's LMDB map full or its folder removed, a segment file
that does not match its manifest, a disk full while a package is exported."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from exporter.demo_model import build_demo_model
from exporter.export import export_model
from runtime.errors import ModelLoadError
from runtime.manifest import read_manifest, segment_hash
from tests.support.faults.common import (
    ROOT,
    SMALL,
    Answer,
    FaultRecord,
    Load,
    Tally,
    infer_request,
    make_repo,
    metric_sum,
    post,
    ring_of,
    run_load,
    timed,
    token_rows,
)
from tests.support.harness import Ring, http

# --- the result cache ------------------------------------------------------------------------


def cache_map_full(
    work: Path, requests: int = 400, concurrency: int = 8, map_bytes: int = 1 << 20
) -> FaultRecord:
    """The result cache's LMDB map fills up under load (every result admitted at once, more
    distinct results than the map holds): every request is still answered by the ring, and
    the cache turns itself off instead of failing requests."""
    record = FaultRecord(
        "LMDB result cache map full",
        f"{requests:,} requests at concurrency {concurrency}: {requests // 2} distinct inputs "
        f"(4 KiB results), each sent twice; LMDB map {map_bytes // 1024} KiB; 1 node",
    )
    ring = Ring(work, make_repo(work / "repo"))
    with timed(record):
        # cache_max_bytes as large as the map: LMDB's own pages fill it before eviction starts
        ring.start_coordinator(
            *("--cache-admit-after", "1", "--cache-max-bytes", str(map_bytes)),
            *("--cache-map-bytes", str(map_bytes)),
        )
        try:
            ring.start_node("a")
            ring.wait_members(1)
            ring.load("demo", stages=1, replicas=1)
            ring.wait_ready()
            tally = run_load(ring.url, _twice(requests // 2, 16), concurrency, requests, headers={})
            degraded = metric_sum(ring.url, "appliance_cache", what="degraded")
        finally:
            ring.stop()
    record.count(tally)
    map_full = "MapFull" in (work / "coordinator.log").read_text()
    record.details = {"cache": dict(tally.cache), "degraded": degraded, "map_full_logged": map_full}
    record.outcome = (
        f"cache {'turned itself off (MapFull logged)' if degraded and map_full else 'STILL ON'} "
        f"after {tally.cache['hit']} hits; every request answered by the ring"
    )
    return record


def _twice(distinct: int, group: int) -> list[np.ndarray]:
    """``distinct`` inputs in groups of ``group``, each group sent twice in a row: the second
    round can hit while the map still has room."""
    rows = token_rows(distinct, 16, seed=3)
    return [ids for start in range(0, distinct, group) for ids in rows[start : start + group] * 2]


def cache_dir_removed(work: Path, requests: int = 600, concurrency: int = 8) -> FaultRecord:
    """The cache directory is deleted while the coordinator serves repeated inputs (hits):
    requests are still answered; a restarted coordinator makes a new, working cache."""
    record = FaultRecord(
        "result cache directory removed at run time",
        f"{requests:,} requests at concurrency {concurrency} over 20 inputs (hits), the folder "
        "removed after 30 %; then a coordinator restart and 40 more; 1 node",
    )
    inputs = token_rows(20, 8, seed=2)
    with timed(record), ring_of(work, ["a"], 1, 1, "--cache-admit-after", "1") as ring:
        with Load(ring.url, inputs, concurrency, requests, headers={}) as load:
            load.wait_answered(requests * 3 // 10)
            shutil.rmtree(work / "coordinator" / "cache")
            tally = load.join()
        record.count(tally)
        assert ring.coordinator is not None
        ring.coordinator.terminate()
        ring.coordinator.wait()
        ring.start_coordinator("--cache-admit-after", "1")
        ring.wait_members(1)
        ring.wait_ready()
        again = run_load(ring.url, inputs, 4, 40, headers={})
        record.count(again)
        recreated = (work / "coordinator" / "cache" / "data.mdb").is_file()
    record.details = {"cache": dict(tally.cache), "after_restart": dict(again.cache)}
    record.details["recreated"] = recreated
    record.outcome = (
        f"{tally.cache['hit']} hits and {tally.cache['miss']} misses with the folder gone "
        f"(LMDB keeps its open files); after a restart the cache was "
        f"{'made again' if recreated else 'NOT made again'}, {again.cache['hit']} hits of 40"
    )
    return record


# --- model packages --------------------------------------------------------------------------


def segment_sha256_mismatch(work: Path, requests: int = 300, concurrency: int = 8) -> FaultRecord:
    """A second model in the coordinator's repository has a segment file whose bytes do not
    match its manifest: its load is refused with an error naming the file, it is never served,
    and the healthy model keeps serving meanwhile."""
    record = FaultRecord(
        "segment file whose sha256 does not match the manifest",
        f"{requests:,} requests at concurrency {concurrency} to a healthy model while the "
        "tampered one is loaded, then 10 to the tampered one; 2 nodes",
    )
    repo = make_repo(make_repo(work / "repo"), name="tampered")
    segment = repo / "tampered" / "1" / "segment-1.onnx"
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the middle of the weights
    segment.write_bytes(bytes(data))
    ring = Ring(work, repo)
    with timed(record):
        ring.start_coordinator()
        try:
            for node in ("a", "b"):
                ring.start_node(node)
            ring.wait_members(2)
            ring.load("demo", stages=1, replicas=2)
            ring.wait_ready()
            with Load(ring.url, token_rows(8), concurrency, requests) as load:
                load.wait_answered(requests // 5)
                status, answer = http(
                    "POST",
                    f"{ring.url}/v2/repository/models/tampered/load",
                    {"parameters": {"stages": 1, "replicas": 1}},
                )
                tally = load.join()
            served = _tampered_answers(ring)
        finally:
            ring.stop()
    record.count(tally)
    message = str((answer or {}).get("error", ""))
    named = "segment-1.onnx" in message and "sha256" in message
    refused = Tally()
    refused.add(Answer(status, {}, message.encode(), 0), status >= 400 and named)
    record.count(refused)
    record.count(served)
    record.details = {
        "load_status": status,
        "load_error": message,
        "tampered": dict(served.statuses),
    }
    record.outcome = (
        f"load refused {status}{' naming segment-1.onnx and its sha256' if named else ''}; "
        f"the tampered model answered {served.statuses[503]}/{served.sent} with 503 (not placed)"
    )
    return record


def _tampered_answers(ring: Ring) -> Tally:
    tally = Tally()
    body, headers = infer_request(token_rows(1)[0])
    for _ in range(10):
        answer = post(f"{ring.url}/v2/models/tampered/infer", body, headers)
        tally.add(answer, answer.status == 503)
    return tally


WRITE_MODES = ("export", "write-inline", "write-external")


def export_disk_full(work: Path, attempts: int = 3) -> FaultRecord:
    """Export and package writing with too little room for a file: RLIMIT_FSIZE in a child
    process with SIGXFSZ ignored, so a write past the limit fails with EFBIG as on a full disk.
    The limits are taken from the sizes of the files each mode writes, so each attempt fails at
    another file. Nothing may be left where the package would go, nor a temp folder."""
    record = FaultRecord(
        "disk full during export (file size limit)",
        f"{attempts} limits x 3 (export; package writer with weights inline / as external "
        "data); RLIMIT_FSIZE in a child process",
    )
    with timed(record):
        segments = _segment_files(work / "probe")
        for mode in WRITE_MODES:
            sizes = _file_sizes(work / f"probe-{mode}", mode, segments)
            for limit in _spread(sizes, attempts):
                repo = work / f"repo-{mode}-{limit}"
                _judge(
                    record,
                    {"limit": limit, "mode": mode},
                    repo,
                    _in_child(repo, mode, segments, limit),
                )
    _summarise_writes(record)
    return record


def export_disk_full_tmpfs(work: Path, attempts: int = 8) -> FaultRecord:
    """The same with a real full disk: the export's temp folder and the repository on a small
    tmpfs. A bisection finds the smallest tmpfs the export fits in; the attempts then spread
    over the package's size below it, so the disk fills while the package is being written.
    Needs mount (root); the record says so when it was refused."""
    record = FaultRecord(
        "disk full during export (small tmpfs)",
        f"bisection + {attempts} tmpfs sizes up to the smallest that fits; the export's temp "
        "folder and the repository on it",
    )
    with timed(record):
        segments = _segment_files(work / "probe")
        package = sum(p.stat().st_size for p in segments) // 1024 + 8  # + manifest, KiB
        try:
            low, high = package // 2, package * 8  # KiB: too small, big enough
            while high - low > 16:
                middle = (low + high) // 2
                fits = not _export_on_tmpfs(record, work / "mnt", middle, segments)
                low, high = (low, middle) if fits else (middle, high)
            for kib in np.linspace(high - package, high - 4, attempts).astype(int):
                _export_on_tmpfs(record, work / "mnt", int(kib), segments)
        except PermissionError as exc:
            record.outcome = f"not run: {exc}"
            return record
        record.details["smallest_fitting_kib"] = high
    _summarise_writes(record)
    return record


def _export_on_tmpfs(record: FaultRecord, mount: Path, kib: int, segments: list[Path]) -> str:
    """Export onto a fresh tmpfs of ``kib`` KiB; judge and count it; the error, if any."""
    mount.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        raise PermissionError(f"mount refused ({mounted.stderr.strip()[:80]})")
    try:
        (mount / "tmp").mkdir()
        repo = mount / "repo"
        result = _in_child(repo, "export", segments, 0, {"TMPDIR": str(mount / "tmp")})
        _judge(record, {"tmpfs_kib": kib, "mode": "export"}, repo, result)
        # the exporter's own temp folders (other tools may keep files in TMPDIR)
        temp_left = [p.name for p in (mount / "tmp").glob("appliance-export-*")]
        record.details["outcomes"][-1]["temp_left"] = temp_left
        record.failed += bool(temp_left)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    return str(result["error"])


def _judge(
    record: FaultRecord, attempt: dict[str, Any], repo: Path, result: dict[str, Any]
) -> None:
    """A refused write must leave nothing; a write that got through, a complete package."""
    left = _leftovers(repo)
    good = not left if result["error"] else _complete(repo / "demo" / "1")
    in_writer = bool(result["error"]) and (repo / "demo").is_dir()  # the writer makes it first
    record.sent += 1
    record.failed += not good
    outcome = {**attempt, **result, "left": left, "good": good, "in_writer": in_writer}
    record.details.setdefault("outcomes", []).append(outcome)


def _summarise_writes(record: FaultRecord) -> None:
    outcomes = record.details.get("outcomes", [])
    refused = [o for o in outcomes if o["error"]]
    debris = [o for o in refused if o["left"]]
    record.outcome = (
        f"{len(refused)}/{len(outcomes)} refused with an error ("
        + ", ".join(sorted({o["error"].split(":")[0] for o in refused}))
        + f"), {sum(o['in_writer'] for o in refused)} of them while writing the package; "
        + f"{len(debris)} left files"
        + (f" ({debris[0]['left'][:3]})" if debris else "")
        + f"; {len(outcomes) - len(refused)} had room and wrote a complete package"
    )


def _complete(folder: Path) -> bool:
    try:
        manifest = read_manifest(folder)
        return all(
            segment_hash(folder, s.file, s.external_data) == s.sha256 for s in manifest.segments
        )
    except (OSError, ValueError, ModelLoadError):
        return False


def _segment_files(repo: Path) -> list[Path]:
    files = (make_repo(repo) / "demo" / "1").glob("segment-*.onnx")
    return sorted(files, key=lambda p: int(p.stem.split("-")[1]))


def _file_sizes(repo: Path, mode: str, segments: list[Path]) -> list[int]:
    """Sizes of the files a mode writes into the repository, written once without a limit."""
    result = _in_child(repo, mode, segments, 0)
    if result["error"]:
        raise RuntimeError(f"{mode} failed without a limit: {result['error']}")
    return sorted({p.stat().st_size for p in repo.rglob("*") if p.is_file()})


def _spread(sizes: list[int], count: int) -> list[int]:
    """``count`` limits, each just under one of the sizes, from the smallest to the largest."""
    picks = np.linspace(0, len(sizes) - 1, count).round().astype(int)
    return sorted({max(1, sizes[i] - 1) for i in picks})


def _leftovers(repo: Path) -> list[str]:
    """Files, and dot-named (temp) folders, under ``repo``: none may survive a failed write."""
    if not repo.exists():
        return []
    found = (p for p in sorted(repo.rglob("*")) if p.is_file() or p.name.startswith("."))
    return [str(p.relative_to(repo)) for p in found]


def _in_child(
    repo: Path, mode: str, segments: list[Path], limit: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """``write_under_limit`` in a fresh process, so that its rlimit stays there."""
    job = {"limit": limit, "repo": str(repo), "mode": mode, "segments": [str(p) for p in segments]}
    code = (
        "import sys\nfrom tests.support.faults.storage import write_under_limit as w\n"
        "w(sys.argv[1])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    lines = done.stdout.strip().splitlines()
    if not lines:
        return {"error": f"child exited {done.returncode}: {done.stderr[-300:]}"}
    return json.loads(lines[-1])


def write_under_limit(job_json: str) -> None:
    """In a child: export (or write) the small demo package with every file capped at the
    limit (0: none); prints the outcome as one JSON line (stdout is a pipe, not capped)."""
    from exporter.package_writer import write_package

    job = json.loads(job_json)
    repo, limit = Path(job["repo"]), int(job["limit"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    model = build_demo_model(**SMALL)
    segments = [onnx.load(path) for path in job["segments"]]
    if limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    error = ""
    try:
        if job["mode"] == "export":
            export_model(model, repo, "demo", min_segment_bytes=0, source_label="fault")
        else:
            threshold = 0 if job["mode"] == "write-external" else 2**31 - 1
            write_package(
                repo, "demo", 1, segments, source="fault", external_data_threshold=threshold
            )
    except Exception as exc:  # reported: the scenario counts refusals and their messages
        error = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps({"error": error}))
