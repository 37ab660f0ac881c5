"""systemd: units verify cleanly, a node speaks sd_notify, SIGTERM lets in-flight work finish."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from appliance.units import UnitSettings, install_units
from runtime.codec import encode_request
from tests.models import dense_model, put_model

HEADER = "Inference-Header-Content-Length"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_verify_without_a_single_warning(tmp_path: Path) -> None:
    written = install_units(tmp_path, UnitSettings(memory_max="4G"))
    node = tmp_path / "appliance-node@edge1.service"
    node.write_text((tmp_path / "appliance-node@.service").read_text())
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "appliance-coordinator.service"), str(node)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr
    text = written[0].read_text()
    assert f"ExecStart={sys.executable} -m appliance.cli node" in text
    assert "Type=notify" in text and "WatchdogSec=" in text and "MemoryMax=4G" in text


def test_a_node_says_status_then_ready_after_warm_up_and_pings_the_watchdog(
    tmp_path: Path,
) -> None:
    put_model(tmp_path / "repo", "dense", dense_model())
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "node",
            "--model-repo",
            str(tmp_path / "repo"),
            "--port",
            "0",
            "--intra-op-threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().split()[-1]
        messages: list[str] = []
        ready_seen_ready = None
        while len([m for m in messages if m == "WATCHDOG=1"]) < 3:
            message = listener.recv(4096).decode()
            messages.append(message)
            if message == "READY=1" and ready_seen_ready is None:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=5) as response:
                    ready_seen_ready = response.status == 200
        statuses = [m for m in messages if m.startswith("STATUS=")]
        assert any("loading and warming dense" in m for m in statuses)
        assert any("loading dense v1 segment 0 (1/1" in m for m in statuses)
        assert "READY=1" in messages and ready_seen_ready is True
        assert messages.index("READY=1") > messages.index(statuses[0])
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        listener.close()


def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    put_model(tmp_path / "repo", "wide", dense_model(features=1500, units=1500))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "node",
            "--model-repo",
            str(tmp_path / "repo"),
            "--port",
            "0",
            "--intra-op-threads",
            "1",
            "--max-batch-size",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    url = process.stdout.readline().split()[-1]
    for _ in range(300):
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=5):
                break
        except OSError:
            time.sleep(0.05)
    body, length = encode_request({"x": np.ones((256, 1500), np.float32)})
    statuses: list[int] = []

    def one() -> None:
        request = urllib.request.Request(
            url + "/v2/models/wide/infer", data=body, headers={HEADER: str(length)}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            statuses.append(response.status)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # all eight accepted, most still queued behind a one-row batcher
    process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=60)
    assert process.wait(timeout=60) == 0
    assert statuses == [200] * 8


def _notifications(listener: socket.socket, until: str, timeout_s: float = 60) -> list[str]:
    """sd_notify messages received until one equals ``until`` (every message kept)."""
    messages: list[str] = []
    end = time.monotonic() + timeout_s
    while until not in messages:
        listener.settimeout(max(0.1, end - time.monotonic()))
        try:
            messages.append(listener.recv(4096).decode())
        except TimeoutError:
            raise AssertionError(f"no {until} in {timeout_s}s; got {messages}") from None
    return messages


def test_a_ring_node_is_ready_once_the_spans_placed_on_it_are_warm(tmp_path: Path) -> None:
    from exporter.package_writer import write_package
    from tests.models import dense_segments
    from tests.support.harness import Ring, http

    repo = tmp_path / "repo"
    write_package(repo, "dense2", 1, list(dense_segments()), source="test")
    ring = Ring(tmp_path / "ring", repo)
    short = Path(tempfile.mkdtemp(prefix="sdn-"))  # AF_UNIX paths are limited to 108 bytes
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(short / "notify"))
    env = {"NOTIFY_SOCKET": str(short / "notify")}
    try:
        ring.start_coordinator()
        ring.start_node("a", env=env)
        first = _notifications(listener, "READY=1")  # nothing placed on it: ready once joined
        assert first[0].startswith("STATUS=joining")
        assert any(m.startswith("STATUS=joined") for m in first), first
        ring.load("dense2", 1, 1)
        ring.kill("a")
        ring.nodes["a"].wait(timeout=10)
        ring.start_node("a", env=env)  # a new incarnation: the pinned placement still holds a
        messages = _notifications(listener, "READY=1")
        loading = [m for m in messages if m.startswith("STATUS=") and "loading dense2 0-1" in m]
        assert loading, messages
        assert messages.index(loading[0]) < messages.index("READY=1")
        status, view = http("GET", ring.url + "/v2/cluster")
        held = [s for n in view["nodes"] if n["node_id"] == "a" for s in n["spans"]]
        assert status == 200 and [(s["model"], s["first"], s["last"]) for s in held] == [
            ("dense2", 0, 1)
        ]
        assert any(m.startswith("STATUS=") and "holding dense2 0-1" in m for m in messages)
    finally:
        ring.stop()
        listener.close()
        shutil.rmtree(short, ignore_errors=True)
