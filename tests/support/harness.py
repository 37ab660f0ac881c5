"""Real coordinator and node processes on loopback (ring integration tests, bench/ring.py)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.codec import decode_response, encode_request

HEADER = "Inference-Header-Content-Length"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "a")  # noqa: SIM115 - the process owns it until it exits
    process = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", *args],
        stdout=subprocess.PIPE,
        stderr=handle,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"https?://\S+", line)
    if not match:
        process.kill()
        raise AssertionError(f"no listening line from {args[:2]}: {line!r}; see {log}")
    return process, match.group(0)


def coordinator_args(repo: Path, work: Path, port: int, *extra: str) -> list[str]:
    """The command line of a test ring's coordinator: short node timeouts and attempts, so
    that faults show within a test's time (the harnesses on loopback and on test hosts)."""
    return [
        "coordinator",
        "--model-repo",
        str(repo),
        "--port",
        str(port),
        "--state-dir",
        str(work / "coordinator"),
        "--node-timeout-s",
        "2",
        "--min-attempt-s",
        "0.5",
        "--log-level",
        "info",
        *extra,
    ]


def http(
    method: str, url: str, body: Any = None, timeout: float = 30, token: str = ""
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw else None


@dataclass
class Ring:
    work: Path
    repo: Path
    coordinator_port: int = field(default_factory=free_port)
    coordinator: subprocess.Popen[str] | None = None
    nodes: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    node_urls: dict[str, str] = field(default_factory=dict)
    signed: bool = True  # internal calls signed with a cluster secret made for this ring
    token: str = ""  # an admin token the harness's own calls present (when auth is on)

    @property
    def secrets_file(self) -> Path:
        path = self.work / "cluster-secrets"
        if not path.exists():
            self.work.mkdir(parents=True, exist_ok=True)
            path.write_text(os.urandom(32).hex() + "\n")
        return path

    def _signing(self) -> list[str]:
        return ["--cluster-secrets-file", str(self.secrets_file)] if self.signed else []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.coordinator_port}"

    def start_coordinator(self, *extra: str) -> None:
        self.coordinator, _ = _start(
            coordinator_args(self.repo, self.work, self.coordinator_port, *self._signing(), *extra),
            self.work / "coordinator.log",
        )

    def start_serve_in_process(self, *extra: str) -> None:
        """``appliance serve --nodes 1 --in-process-node`` as the coordinator: one process
        holding the coordinator and node ``local-0``; other nodes join it as they join a
        coordinator (it serves the repository's models on its node until ``load`` places them
        across the ring)."""
        node_config = self.work / "in-process-node.toml"
        self.work.mkdir(parents=True, exist_ok=True)
        node_config.write_text("heartbeat_interval_s = 0.3\nmin_attempt_s = 0.5\n")
        args = coordinator_args(self.repo, self.work, self.coordinator_port, *self._signing(),
                                *extra)  # fmt: skip
        args[0:1] = ["serve", "--nodes", "1", "--in-process-node", "--node-config",
                     str(node_config)]  # fmt: skip
        self.coordinator, _ = _start(args, self.work / "coordinator.log")

    def start_node(
        self, node_id: str, *extra: str, threads: int = 1, env: dict[str, str] | None = None
    ) -> str:
        process, url = _start(
            [
                "node",
                "--port",
                "0",
                "--join",
                f"127.0.0.1:{self.coordinator_port}",
                "--node-id",
                node_id,
                "--model-repo",
                str(self.work / node_id),
                "--intra-op-threads",
                str(threads),
                "--heartbeat-interval-s",
                "0.3",
                "--min-attempt-s",
                "0.5",
                "--log-level",
                "info",
                *self._signing(),
                *extra,
            ],
            self.work / f"{node_id}.log",
            env,
        )
        self.nodes[node_id] = process
        self.node_urls[node_id] = url
        return url

    def wait_members(self, count: int, timeout_s: float = 60) -> dict[str, Any]:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            status, view = http("GET", self.url + "/v2/cluster", token=self.token)
            if status == 200 and sum(n["healthy"] for n in view["nodes"]) >= count:
                return view
            time.sleep(0.1)
        raise AssertionError(f"{count} members did not join in {timeout_s}s")

    def wait_ready(self, timeout_s: float = 60) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if http("GET", self.url + "/v2/health/ready")[0] == 200:
                return
            time.sleep(0.1)
        raise AssertionError(f"coordinator not ready in {timeout_s}s")

    def load(self, model: str, stages: int, replicas: int) -> None:
        status, body = http(
            "POST",
            f"{self.url}/v2/repository/models/{model}/load",
            {"parameters": {"stages": stages, "replicas": replicas}},
            timeout=120,
            token=self.token,
        )
        assert status == 200, body

    def infer(
        self, model: str, ids: np.ndarray, url: str | None = None, timeout_us: int | None = None
    ) -> np.ndarray:
        parameters = {"timeout": timeout_us} if timeout_us else None
        body, length = encode_request({"input_ids": ids}, parameters=parameters)
        request = urllib.request.Request(
            f"{url or self.url}/v2/models/{model}/infer",
            data=body,
            method="POST",
            headers={HEADER: str(length), "Cache-Control": "no-cache, no-store"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            result = decode_response(response.read(), int(response.headers[HEADER]))
        return result.outputs["last_hidden_state"]

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        self.nodes[node_id].send_signal(sig)

    def stop(self) -> None:
        for process in [*self.nodes.values(), self.coordinator]:
            if process is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.nodes.values(), self.coordinator]:
            if process is None:
                continue
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
