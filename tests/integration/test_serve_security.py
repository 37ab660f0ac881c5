"""``appliance serve`` with the README's security settings: TLS on every local member (a
self-signed certificate for 127.0.0.1, or a CA-signed one for another name), and tokens that
its local nodes require too."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from appliance.security.tls import client_context
from tests.integration.test_tls import make_pki, openssl
from tests.support.faults.common import make_repo

pytestmark = pytest.mark.slow
ADMIN, USER = "admin:" + "a" * 24, "infer:" + "u" * 24
INFER = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}]}


def serve(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen[str], str]:
    """`appliance serve` on a small model; its URL once the ring is placed (its one line)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "serve", "--port", "0", "--nodes", "2", *flags,
         "--model-repo", str(make_repo(tmp_path / "repo")), "--state-dir", str(tmp_path / "st")],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "serve.log", "w"),  # noqa: SIM115 - the process owns it
        text=True,
        env={**os.environ},
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"https?://\S+", line)
    if not match:
        process.kill()
        raise AssertionError(f"serve did not come up: {(tmp_path / 'serve.log').read_text()}")
    return process, match.group(0)


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def call(
    url: str, body: Any = None, token: str = "", context: ssl.SSLContext | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token.split(":", 1)[1]
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_serve_with_a_self_signed_certificate_for_127_0_0_1(tmp_path: Path) -> None:
    cert, key = str(tmp_path / "self.pem"), str(tmp_path / "self.key")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
            "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-addext", "extendedKeyUsage=serverAuth,clientAuth")  # fmt: skip
    process, url = serve(tmp_path, "--tls-cert", cert, "--tls-key", key)
    try:
        assert url.startswith("https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=cert)
        status, answer = call(url + "/v2/models/demo/infer", INFER, context=trusting)
        assert status == 200 and answer["outputs"][0]["shape"] == [1, 3, 64]
        status, view = call(url + "/v2/cluster", context=trusting)
        assert [n["address"][:8] for n in view["nodes"]] == ["https://"] * 2  # nodes too
    finally:
        stop(process)


def test_serve_with_a_ca_signed_certificate_for_another_name(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, name="ring.appliance.test")
    process, url = serve(
        tmp_path,
        "--tls-cert", pki["cert"], "--tls-key", pki["key"], "--tls-ca", pki["ca"],
        "--tls-server-name", "ring.appliance.test",
    )  # fmt: skip
    try:
        named = client_context(pki["ca"], server_name="ring.appliance.test")
        assert isinstance(named, ssl.SSLContext)
        status, answer = call(url + "/v2/models/demo/infer", INFER, context=named)
        assert status == 200
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED|match"):
            call(url + "/v2", context=ssl.create_default_context(cafile=pki["ca"]))
    finally:
        stop(process)


def test_serve_with_tokens_closes_its_nodes_too(tmp_path: Path) -> None:
    process, url = serve(tmp_path, "--tokens", ADMIN, USER)
    try:
        assert call(url + "/v2/models/demo/infer", INFER)[0] == 401
        assert call(url + "/v2/models/demo/infer", INFER, USER)[0] == 200
        status, view = call(url + "/v2/cluster", token=ADMIN)
        assert status == 200
        for node in view["nodes"]:
            assert call(node["address"] + "/v2/models/stats")[0] == 401  # not open any more
            assert call(node["address"] + "/v2/models/stats", token=USER)[0] == 403
            assert call(node["address"] + "/v2/models/stats", token=ADMIN)[0] == 200
        log = (tmp_path / "serve.log").read_text()
        assert "auth is OFF" not in log
        assert oct((tmp_path / "st" / "tokens").stat().st_mode & 0o777) == "0o600"
    finally:
        stop(process)
