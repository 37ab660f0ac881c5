"""The ``appliance`` command as a real subprocess: node on a repo, serve on the demo model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from runtime.codec import decode_response, encode_request
from tests.models import dense_model, put_model

HEADER = "Inference-Header-Content-Length"


def start(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"http://\S+", line)
    if not match:
        process.kill()
        raise AssertionError(f"no listening line: {line!r} {process.stderr.read()!r}")  # type: ignore[union-attr]
    return process, match.group(0)


def wait_ready(url: str, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready in {timeout_s}s")


def infer(url: str, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    body, length = encode_request(inputs)
    request = urllib.request.Request(
        f"{url}/v2/models/{model}/infer", data=body, headers={HEADER: str(length)}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return decode_response(response.read(), int(response.headers[HEADER])).outputs


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=30)


def test_node_serves_a_repository_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    put_model(tmp_path, "dense", dense_model())
    process, url = start(
        ["node", "--model-repo", str(tmp_path), "--port", "0", "--intra-op-threads", "1"]
    )
    try:
        wait_ready(url)
        outputs = infer(url, "dense", {"x": np.ones((2, 4), np.float32)})
        assert outputs["y"].shape == (2, 3)
    finally:
        assert stop(process) == 0


@pytest.mark.slow
def test_serve_builds_and_serves_the_demo_model(tmp_path: Path) -> None:
    process, url = start(["serve", "--port", "0"], env={"XDG_CACHE_HOME": str(tmp_path)})
    try:
        wait_ready(url)
        assert (tmp_path / "onnx-appliance" / "models" / "demo" / "1" / "manifest.json").is_file()
        ids = np.arange(16, dtype=np.int64).reshape(1, 16)
        hidden = infer(url, "demo", {"input_ids": ids})["last_hidden_state"]
        assert hidden.shape == (1, 16, 384) and np.isfinite(hidden).all()
    finally:
        assert stop(process) == 0
    # the nodes stop first and say goodbye to a coordinator still listening
    log = process.stderr.read() if process.stderr is not None else ""
    assert "could not tell the coordinator" not in log, log[-3000:]
    assert "node local-0 left" in log and "node local-1 left" in log, log[-3000:]


def test_serve_places_every_model_of_a_repository_as_each_can_be(tmp_path: Path) -> None:
    """Default flags: a Triton-style model.onnx (one segment: one span, on every node), a
    package exported with --stages 2 (its default_stages), another plain model, and one that
    cannot be placed (a broken file), which is logged and keeps no other from serving."""
    from exporter.demo_model import build_demo_model
    from exporter.export import export_model

    repo = tmp_path / "models"
    put_model(repo, "mlp", dense_model(features=4, units=3))
    put_model(repo, "tiny", dense_model(features=4, units=2, seed=1))
    small = build_demo_model(blocks=4, hidden=32, heads=2, ffn=64, vocab=50)
    export_model(small, repo, "enc", stages=2, min_segment_bytes=0, source_label="test")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    # the local nodes read --node-config (what serve sets for them wins)
    node_config = tmp_path / "node.toml"
    node_config.write_text("memory_budget = 3000000000\nport = 1\n")
    process, url = start(["serve", "--port", "0", "--model-repo", str(repo),
                          "--node-config", str(node_config)])  # fmt: skip
    try:
        wait_ready(url)
        x = np.ones((2, 4), dtype=np.float32)
        assert infer(url, "mlp", {"x": x})["y"].shape == (2, 3)
        assert infer(url, "tiny", {"x": x})["y"].shape == (2, 2)
        ids = np.arange(6, dtype=np.int64).reshape(1, 6)
        assert infer(url, "enc", {"input_ids": ids})["last_hidden_state"].shape == (1, 6, 32)
        with urllib.request.urlopen(url + "/v2/cluster", timeout=10) as response:
            cluster = json.loads(response.read())
        placements = cluster["placements"]
        assert [m["memory_budget"] for m in cluster["nodes"]] == [3_000_000_000] * 3
        assert all(not m["address"].endswith(":1") for m in cluster["nodes"])
        assert sorted(placements) == ["enc", "mlp", "tiny"]
        assert len(placements["enc"]["spans"]) == 2  # the package's default_stages
        assert [len(s["replicas"]) for s in placements["mlp"]["spans"]] == [3]  # every node
    finally:
        assert stop(process) == 0
    log = process.stderr.read() if process.stderr is not None else ""
    assert "broken is not served" in log, log[-3000:]
    assert "mlp placed as 1 span(s)" in log and "it has 1 segment(s)" in log, log[-3000:]


def test_bad_config_exits_2_with_the_reason(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("max_batch_sise = 4\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "node",
            "--config",
            str(config),
            "--model-repo",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "unknown key(s) max_batch_sise" in result.stderr
    # serve reads its nodes' file before it builds anything
    result = run_cli("serve", "--node-config", str(config), "--port", "0")
    assert result.returncode == 2 and "unknown key(s) max_batch_sise" in result.stderr
    result = run_cli("serve", "--node-threads", "-1", "--port", "0")
    assert result.returncode == 2 and "--node-threads must be 0" in result.stderr, result.stderr
    result = run_cli("serve", "--node-alone-threads", "-2", "--port", "0")
    assert result.returncode == 2 and "--node-alone-threads must be -1" in result.stderr, (
        result.stderr
    )
    result = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "node"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "--model-repo" in result.stderr


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_a_missing_repository_is_an_error_at_start(tmp_path: Path) -> None:
    typo = str(tmp_path / "modles")
    for command in (
        ["coordinator", "--model-repo", typo, "--port", "0"],
        ["node", "--model-repo", typo, "--port", "0"],
        ["serve", "--model-repo", typo, "--port", "0"],
    ):
        result = run_cli(*command, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
        assert result.returncode == 2, (command, result.stderr)
        assert f"the model repository {typo} does not exist" in result.stderr
    assert not Path(typo).exists()  # nothing was built in the mistyped folder


def test_install_units_refuses_a_memory_limit_systemd_would_ignore(tmp_path: Path) -> None:
    result = run_cli("install-units", "--prefix", str(tmp_path), "--memory-max", "twelve")
    assert result.returncode == 2 and "not a systemd memory limit" in result.stderr
    assert list(tmp_path.iterdir()) == []
    result = run_cli("install-units", "--prefix", str(tmp_path), "--memory-max", "12G")
    assert (
        result.returncode == 0
        and "MemoryMax=12G" in (tmp_path / "appliance-node@.service").read_text()
    )


def test_a_node_that_cannot_join_says_why_at_once_and_once(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "node", "--model-repo", str(tmp_path / "cache"),
         "--port", "0", "--join", f"127.0.0.1:{port}", "--log-level", "info"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(4.0)  # several attempts, backing off
    process.send_signal(signal.SIGTERM)
    _, log = process.communicate(timeout=30)
    lines = [line for line in log.splitlines() if "cannot join" in line]
    assert len(lines) == 1, log  # the reason, at once, and not again for the same reason
    assert f"127.0.0.1:{port}" in lines[0] and "retrying" in lines[0]


def test_serve_restarted_on_its_state_dir_keeps_the_placement(tmp_path: Path) -> None:
    """A second run on the same --state-dir serves the placement the first one pinned, as it
    was: the same spans on the same local nodes, no re-placement (which would reload them)."""
    from exporter.demo_model import build_demo_model
    from exporter.export import export_model

    repo = tmp_path / "models"
    small = build_demo_model(blocks=4, hidden=32, heads=2, ffn=64, vocab=50)
    export_model(small, repo, "enc", stages=2, min_segment_bytes=0, source_label="test")
    args = ["serve", "--port", "0", "--nodes", "2", "--model-repo", str(repo),
            "--state-dir", str(tmp_path / "state")]  # fmt: skip
    ids = np.arange(6, dtype=np.int64).reshape(1, 6)
    placements, logs = [], []
    for _ in range(2):
        process, url = start(args)
        try:
            wait_ready(url)
            assert infer(url, "enc", {"input_ids": ids})["last_hidden_state"].shape == (1, 6, 32)
            with urllib.request.urlopen(url + "/v2/cluster", timeout=10) as response:
                placements.append(json.loads(response.read())["placements"]["enc"])
        finally:
            assert stop(process) == 0
        logs.append(process.stderr.read() if process.stderr is not None else "")
    assert placements[1] == placements[0], placements
    assert "kept from the last run" not in logs[0] and "kept from the last run" in logs[1], logs[1]
    assert "now serves" in logs[0] and "now serves" not in logs[1], logs[1][-3000:]  # no switch
