"""Clients that misbehave at the connection level, against a live coordinator: slow headers,
slow bodies, answers never read, idle keep-alive, and floods of incomplete connections up to
and past the descriptor limit (the coordinator started under ``prlimit``)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from appliance.http.connections import REASONS
from tests.support.faults.common import (
    NO_CACHE,
    Background,
    FaultRecord,
    answer_matches,
    infer_request,
    make_repo,
    post,
    reference,
    timed,
    token_rows,
)
from tests.support.harness import Ring, coordinator_args

ROOT = Path(__file__).resolve().parents[3]


# --- a coordinator under a descriptor limit ----------------------------------------------------


def _start_coordinator(ring: Ring, nofile: str, *extra: str) -> None:
    """As ``Ring.start_coordinator``, under ``prlimit --nofile=SOFT:HARD`` when given."""
    secrets = ["--cluster-secrets-file", str(ring.secrets_file)]
    args = coordinator_args(ring.repo, ring.work, ring.coordinator_port, *secrets, *extra)
    prefix = ["prlimit", f"--nofile={nofile}"] if nofile else []
    log = open(ring.work / "coordinator.log", "a")  # noqa: SIM115 - the process owns it
    process = subprocess.Popen(
        [*prefix, sys.executable, "-m", "appliance.cli", *args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not re.search(r"https?://\S+", line):
        process.kill()
        raise AssertionError(f"no listening line from the coordinator: {line!r}")
    ring.coordinator = process


@contextlib.contextmanager
def limited_ring(work: Path, nofile: str, *coordinator: str) -> Iterator[Ring]:
    """A coordinator (under ``nofile``) and one node with the small demo model placed."""
    work.mkdir(parents=True, exist_ok=True)
    ring = Ring(work, make_repo(work / "repo"))
    _start_coordinator(ring, nofile, *coordinator)
    try:
        ring.start_node("a")
        ring.wait_members(1)
        ring.load("demo", stages=1, replicas=1)
        ring.wait_ready()
        yield ring
    finally:
        ring.stop()


def metrics(url: str) -> dict[str, dict[str, float]]:
    """/metrics as {name: {"label=value,...": value}} (just what the scenarios read)."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[key] = sample.value
    return found


def closed_by_reason(url: str) -> dict[str, int]:
    closed = metrics(url).get("appliance_connections_closed_total", {})
    return {r: int(closed.get(f"reason={r}", 0)) for r in REASONS if closed.get(f"reason={r}")}


# --- a good client alongside ----------------------------------------------------------------


class GoodClient(Background):
    """One request every ``every_s`` on a fresh connection (the hardest kind to admit at the
    cap), each with ``timeout_s``: how long the well-behaved waited during the fault."""

    def __init__(self, url: str, every_s: float = 0.2, timeout_s: float = 5.0) -> None:
        ids = token_rows(1, 8, seed=3)[0]
        self.body, self.headers = infer_request(ids)
        self.want = reference(ids)
        self.url = f"{url}/v2/models/demo/infer"
        self.every_s = every_s
        self.timeout_s = timeout_s
        self.seconds: list[float] = []
        self.failed: list[str] = []
        super().__init__()

    def _run(self) -> None:
        while not self._stop.is_set():
            answer = post(self.url, self.body, {**self.headers, **NO_CACHE}, self.timeout_s)
            if answer_matches(answer, self.want) and answer.seconds <= self.timeout_s:
                self.seconds.append(answer.seconds)
            else:
                self.failed.append(f"{answer.status} after {answer.seconds:.1f} s")
            self._stop.wait(self.every_s)

    def p99_ms(self) -> float:
        ordered = sorted(self.seconds)
        return (
            round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 1)
            if (ordered)
            else 0.0
        )


# --- slow and never-reading clients -------------------------------------------------------------


def _closed_after(sock: socket.socket, limit_s: float) -> tuple[float, bytes]:
    started = time.monotonic()
    sock.settimeout(limit_s)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return time.monotonic() - started, got


def _connect(port: int, rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    return sock


def _big_json_request() -> bytes:
    """32 rows x 320 tokens as JSON: the answer, 655,360 floats as JSON, is over 8 MB."""
    ids = [[(r * 7 + t) % 300 for t in range(320)] for r in range(32)]
    return json.dumps(
        {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [32, 320], "data": ids}]}
    ).encode()


def slow_clients(
    work: Path, header_s: float = 10.0, grace_s: float = 5.0, write_s: float = 30.0
) -> FaultRecord:
    """Four connections that each stall one phase, at once, against a live coordinator: silent,
    headers never finished, a body stalled after one byte, an answer over 8 MB never read
    (SO_RCVBUF 4 KiB). Each must be ended within its timeout + 1 s, counted by reason, while a
    good client is answered throughout."""
    record = FaultRecord(
        "slow and never-reading clients",
        f"silent, half headers, 1 byte of a 100 KB body, a 12 MB answer never read; "
        f"timeouts: headers {header_s:g} s, body floor 1 KiB/s over {grace_s:g} s, "
        f"write {write_s:g} s",
        group="connections",
    )
    flags = ["--header-timeout-s", str(header_s), "--body-grace-s", str(grace_s)]
    flags += ["--write-timeout-s", str(write_s)]
    with timed(record), limited_ring(work, "", *flags) as ring:
        log = ring.work / "coordinator.log"
        log_before = log.stat().st_size
        port = ring.coordinator_port
        silent, partial, body, reader = _connect(port), _connect(port), _connect(port), None
        partial.sendall(b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: x\r\n")
        body.sendall(
            b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 102400\r\n\r\nx"
        )
        reader = _connect(port, rcvbuf=4096)
        request = _big_json_request()
        reader.sendall(
            b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"Cache-Control: no-cache\r\nContent-Length: %d\r\n\r\n" % len(request)
            + request
        )
        started = time.monotonic()
        waits: dict[str, tuple[float, bytes]] = {}
        threads = [
            threading.Thread(target=lambda k=k, s=s: waits.__setitem__(k, _closed_after(s, 60)))
            for k, s in (("silent", silent), ("partial", partial), ("body", body))
        ]
        with GoodClient(ring.url) as good:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            while time.monotonic() - started < write_s + 15:
                if closed_by_reason(ring.url).get("write_timeout"):
                    break
                time.sleep(0.2)
            write_cut_s = time.monotonic() - started
        for sock in (silent, partial, body, reader):
            sock.close()
        reasons = closed_by_reason(ring.url)
        log_bytes = log.stat().st_size - log_before
    limits = {"silent": header_s, "partial": header_s, "body": grace_s}
    ends = {k: round(waits[k][0], 2) for k in limits}
    late = [k for k, limit in limits.items() if not limit - 0.2 <= ends[k] <= limit + 1]
    body_answer = waits["body"][1][:12].decode("latin-1", "replace")
    if not (write_s <= write_cut_s <= write_s + 1 + 5):  # + the answer's own compute time
        late.append("never-reading")
    record.sent = len(good.seconds) + len(good.failed)
    record.failed = len(good.failed) + len(late)
    record.details = {
        "ended_after_s": ends | {"never_reading": round(write_cut_s, 2)},
        "closed_by_reason": reasons,
        "slow_body_answer": body_answer,
        "good_answered": len(good.seconds),
        "good_p99_ms": good.p99_ms(),
        "late": late,
        "log_bytes": log_bytes,
    }
    record.outcome = (
        f"silent {ends['silent']} s, half headers {ends['partial']} s, slow body "
        f"{ends['body']} s ({body_answer.strip()}), never-reading {write_cut_s:.1f} s; "
        f"{len(good.seconds)} good answers, p99 {good.p99_ms()} ms"
        + (f"; LATE: {', '.join(late)}" if late else "")
    )
    return record


# --- floods of incomplete connections ---------------------------------------------------------


def _flood(
    port: int, connections: int, seconds: float, mode: str = "body", processes: int = 1
) -> dict[str, Any]:
    """``connections`` held by ``processes`` flood processes (each its own descriptors)."""
    share = [connections // processes + (i < connections % processes) for i in range(processes)]
    running = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.faults.flood",
                "--port",
                str(port),
                "--connections",
                str(count),
                "--seconds",
                str(seconds),
                "--mode",
                mode,
                "--sources",
                str(8 * processes),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for count in share
    ]
    results = []
    for process in running:
        out, err = process.communicate(timeout=seconds + 120)
        if process.returncode != 0:
            raise AssertionError(f"the flood failed: {err[-2000:]}")
        results.append(json.loads(out))
    total: dict[str, Any] = {"processes": processes}
    for key in ("connections", "opened", "ended_by_server", "connect_errors", "most_held"):
        total[key] = sum(r[key] for r in results)
    total["cpu_s"] = round(sum(r["cpu_s"] for r in results), 2)
    return total


def connection_flood(
    work: Path,
    connections: int = 3000,
    seconds: float = 15.0,
    nofile: str = "1024:20000",
    max_connections: int = 900,
    label: str = "",
    processes: int = 1,
) -> FaultRecord:
    """``connections`` clients that send headers and 1 byte of a 100 KB body, then nothing, and
    connect again when ended, for ``seconds``, against a coordinator under ``nofile`` capped at
    ``max_connections`` (0: its own budget): a good client must be answered within 5 s
    throughout, the log must grow by less than 1 MB, and what was ended is counted by reason."""
    cap = f"cap {max_connections:,}" if max_connections else "cap from its budget"
    record = FaultRecord(
        label or "flood of incomplete connections",
        f"{connections:,} connections from {processes} process(es), headers + 1 byte of a "
        f"100 KB body each, reconnecting, {seconds:g} s; coordinator under nofile "
        f"{nofile or 'of the machine'}, {cap}",
        group="connections",
    )
    flags = ["--max-connections", str(max_connections)] if max_connections else []
    with timed(record), limited_ring(work, nofile, *flags) as ring:
        log = ring.work / "coordinator.log"
        before_bytes = log.stat().st_size
        with GoodClient(ring.url) as good:
            flood = _flood(ring.coordinator_port, connections, seconds, processes=processes)
        log_bytes = log.stat().st_size - before_bytes
        found = metrics(ring.url)
        reasons = closed_by_reason(ring.url)
        descriptors = found.get("appliance_descriptors", {})
        emfile = sum(found.get("appliance_accept_errors_total", {}).values())
        alive = ring.coordinator is not None and ring.coordinator.poll() is None
    record.sent = len(good.seconds) + len(good.failed)
    record.failed = len(good.failed)
    record.details = {
        "flood": flood,
        "closed_by_reason": reasons,
        "good_answered": len(good.seconds),
        "good_failed": good.failed[:5],
        "good_p99_ms": good.p99_ms(),
        "good_max_s": round(max(good.seconds, default=0.0), 2),
        "log_bytes": log_bytes,
        "descriptor_limit": descriptors.get("what=limit"),
        "cap": descriptors.get("what=cap"),
        "accept_errors": emfile,
        "coordinator_alive": alive,
    }
    shed = sum(n for r, n in reasons.items() if r.startswith("shed_"))
    timed_out = sum(reasons.get(r, 0) for r in ("body_too_slow", "header_timeout"))
    record.outcome = (
        f"{flood['opened']:,} opened (most held {flood['most_held']:,}); ended: {shed:,} shed, "
        f"{timed_out:,} timed out, {reasons.get('rejected_cap', 0):,} refused at the cap"
        + (f", {emfile:.0f} failed accepts" if emfile else "")
        + f"; {len(good.seconds)}/{record.sent} good answered, p99 {good.p99_ms()} ms; "
        f"log +{log_bytes / 1024:.0f} KiB"
    )
    return record
