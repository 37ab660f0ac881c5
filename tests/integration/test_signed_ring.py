"""A secret rotation keeps a signed ring serving and shuts out members with another secret
(unsigned, forged and replayed calls: tests/faults/test_ring_faults.py)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from appliance.security.signing import HEADER_SIGNATURE, Signer
from tests.integration.test_ring import make_repo, reference
from tests.support.harness import Ring

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
