"""A ring whose internal calls are signed: unsigned, forged and replayed calls are refused (a
replayed heartbeat cannot keep a dead node alive), and a secret rotation keeps the ring serving."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from appliance.signing import HEADER_SIGNATURE, Signer
from bench.harness import Ring
from tests.integration.test_ring import make_repo, reference

pytestmark = pytest.mark.slow


def send(url: str, method: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, str]:
    request = urllib.request.Request(url, data=body or None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def signed_call(
    signer: Signer, url: str, path: str, body: bytes = b""
) -> tuple[str, dict[str, str]]:
    method = "POST" if body else "GET"
    headers = {"Content-Type": "application/json"} if body else {}
    headers[HEADER_SIGNATURE] = signer.header(method, path, headers, body)
    return method, headers


def test_unsigned_forged_and_replayed_internal_calls_are_refused(tmp_path: Path) -> None:
    ring = Ring(tmp_path, make_repo(tmp_path / "repo"))
    ring.start_coordinator()
    try:
        node_url = ring.start_node("a")
        ring.wait_members(1)
        secret = ring.secrets_file.read_text().split()[0].encode()

        status, text = send(node_url + "/internal/hop", "POST", {}, b"{}")
        assert status == 401 and "must be signed" in text
        status, text = send(ring.url + "/internal/heartbeat", "POST", {}, b"{}")
        assert status == 401 and "must be signed" in text
        wrong = Signer(b"w" * 32, "a")
        method, headers = signed_call(wrong, ring.url, "/internal/heartbeat", b"{}")
        status, text = send(ring.url + "/internal/heartbeat", method, headers, b"{}")
        assert status == 401 and "secret this process lacks" in text

        as_coordinator = Signer(secret, "coordinator")
        method, headers = signed_call(as_coordinator, node_url, "/internal/identity")
        status, text = send(node_url + "/internal/identity", method, headers)
        assert status == 200
        identity = json.loads(text)
        beat = json.dumps(
            {**identity, "address": node_url, "memory_budget": 1 << 30, "spans": []}
        ).encode()

        method, headers = signed_call(Signer(secret, "b"), ring.url, "/internal/heartbeat", beat)
        status, text = send(ring.url + "/internal/heartbeat", method, headers, beat)
        assert status == 401 and "on behalf of node 'a'" in text

        method, captured = signed_call(Signer(secret, "a"), ring.url, "/internal/heartbeat", beat)
        assert send(ring.url + "/internal/heartbeat", method, captured, beat)[0] == 200
        ring.kill("a")
        ring.nodes["a"].wait(timeout=10)
        # replay the captured heartbeat of the dead node until it would have timed out twice
        replays = refused = 0
        end = time.monotonic() + 4.5
        while time.monotonic() < end:
            status, text = send(ring.url + "/internal/heartbeat", method, captured, beat)
            replays += 1
            refused += status == 401 and "already received" in text
            time.sleep(0.2)
        assert replays == refused and replays > 10
        view = json.loads(send(ring.url + "/v2/cluster", "GET", {})[1])
        assert [n["healthy"] for n in view["nodes"] if n["node_id"] == "a"] == [False]
    finally:
        ring.stop()


def test_a_secret_rotation_keeps_the_ring_serving_and_shuts_out_other_secrets(
    tmp_path: Path,
) -> None:
    old, new, other = ("o" * 40, "n" * 40, "x" * 40)

    def secrets(name: str, *values: str) -> str:
        path = tmp_path / f"secrets-{name}"
        path.write_text("".join(v + "\n" for v in values))
        return str(path)

    ring = Ring(tmp_path, make_repo(tmp_path / "repo"), signed=False)
    # mid-rotation: some members already sign with the new secret, some still with the old
    ring.start_coordinator("--cluster-secrets-file", secrets("coordinator", new, old))
    try:
        ring.start_node("a", "--cluster-secrets-file", secrets("a", old, new))
        ring.start_node("b", "--cluster-secrets-file", secrets("b", new, old))
        ring.start_node("c", "--cluster-secrets-file", secrets("c", other))
        ring.wait_members(2)
        ring.load("demo", 2, 1)
        ring.wait_ready()
        ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
        want = reference(ids)
        for _ in range(20):
            np.testing.assert_allclose(ring.infer("demo", ids), want, atol=1e-4)
        view = json.loads(send(ring.url + "/v2/cluster", "GET", {})[1])
        assert sorted(n["node_id"] for n in view["nodes"]) == ["a", "b"]
        assert "secret this process lacks" in (tmp_path / "coordinator.log").read_text()
    finally:
        ring.stop()
