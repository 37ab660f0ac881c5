"""HTTPS on coordinator and nodes, mutual TLS between them; certificates made at run time."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_ring import make_repo
from tests.support.harness import Ring

pytestmark = pytest.mark.slow


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(folder: Path, name: str = "127.0.0.1") -> dict[str, str]:
    """A throwaway CA and one certificate for ``name`` (an IP or a DNS name) signed by it."""
    ca_key, ca, key, csr, cert = (
        str(folder / n) for n in ("ca.key", "ca.pem", "host.key", "host.csr", "host.pem")
    )
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        ca_key,
        "-out",
        ca,
        "-days",
        "1",
        "-subj",
        "/CN=appliance test CA",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        key,
        "-out",
        csr,
        "-subj",
        f"/CN={name}",
    )
    ext = folder / "ext.cnf"
    kind = "IP" if name.replace(".", "").isdigit() else "DNS"
    ext.write_text(f"subjectAltName={kind}:{name}\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "1",
        "-extfile",
        str(ext),
    )
    return {"ca": ca, "cert": cert, "key": key}


def test_a_ring_over_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = ["--tls-cert", pki["cert"], "--tls-key", pki["key"], "--tls-ca", pki["ca"]]
    ring = Ring(tmp_path, make_repo(tmp_path / "repo"))
    ring.start_coordinator(*tls)
    try:
        url = f"https://127.0.0.1:{ring.coordinator_port}"
        for node in ("a", "b"):
            ring.start_node(node, *tls, "--join", f"127.0.0.1:{ring.coordinator_port}")
        client = ssl.create_default_context(cafile=pki["ca"])  # a public client: no cert

        def call(method: str, path: str, body: object = None) -> tuple[int, object]:
            data = json.dumps(body).encode() if body is not None else None
            request = urllib.request.Request(
                url + path, data=data, method=method, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=60, context=client) as response:
                    raw = response.read()
                    return response.status, json.loads(raw) if raw else None
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read() or b"null")

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # both nodes join over mTLS
            status, view = call("GET", "/v2/cluster")
            if status == 200 and sum(n["healthy"] for n in view["nodes"]) == 2:  # type: ignore[index]
                break
            time.sleep(0.2)
        assert (
            call("POST", "/v2/repository/models/demo/load", {"parameters": {"stages": 2}})[0] == 200
        )
        infer = {
            "inputs": [
                {"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}
            ]
        }
        status, answer = call("POST", "/v2/models/demo/infer", infer)
        assert status == 200 and answer["outputs"][0]["shape"] == [1, 3, 64]  # type: ignore[index]
        # internal paths need a cluster certificate, which a public client does not have
        status, body = call("POST", "/internal/join", {})
        assert status == 403 and "certificate" in body["error"]  # type: ignore[index]
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            # plain HTTP is not spoken
            urllib.request.urlopen(f"http://127.0.0.1:{ring.coordinator_port}/v2", timeout=5)
    finally:
        ring.stop()
