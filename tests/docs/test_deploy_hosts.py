"""docs/deploy.md's three hosts, for real: its configuration files and its `appliance` and
`curl` commands (the blocks it marks needs-several-hosts) run on three test hosts, network
namespaces named coordinator.lan, edge1.lan and edge2.lan, plus a client host. The secrets and
certificates are made by the page's own blocks; the copy to each host (ssh, scp) is done here,
into a folder per host standing for its /etc/appliance and /var/lib/appliance. What needs
systemd or a cluster is covered by tests/deploy (systemd-analyze, the Kubernetes schemas)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.docs_blocks import Block, parse_page
from tests.support.faults.common import make_repo
from tests.support.hosts import require_hosts
from tests.support.hosts_net import Hosts

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PAGE = "docs/deploy.md"
MEMBERS = ("coordinator", "edge1", "edge2")
APPLIANCE = str(Path(sys.executable).parent / "appliance")


def blocks() -> list[Block]:
    return parse_page((ROOT / PAGE).read_text(), PAGE)


def one(found: list[Block], what: str) -> Block:
    assert len(found) == 1, f"{PAGE}: {len(found)} blocks {what}"
    return found[0]


def on_host(tmp: Path, member: str, text: str) -> str:
    """The page's paths, as they are on ``member``: its own folder here."""
    return text.replace("/etc/appliance", str(tmp / member / "etc")).replace(
        "/var/lib/appliance", str(tmp / member / "var")
    )


def install(tmp: Path, member: str, config_name: str, config: str) -> None:
    """What the page's copy loop and "Configure" put on a member."""
    etc = tmp / member / "etc"
    (etc / "tls").mkdir(parents=True)
    (tmp / member / "var").mkdir(parents=True)
    for name in ("cluster-secrets", "tokens"):
        shutil.copy(tmp / "secrets" / name, etc / name)
    for name in ("ca.pem", f"{member}.pem", f"{member}-key.pem"):
        shutil.copy(tmp / "secrets" / name, etc / "tls" / name)
    (etc / config_name).write_text(on_host(tmp, member, config))


def bash_in(hosts: Hosts, host: str, script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*hosts[host].exec_prefix(), "bash", "-e", "-o", "pipefail", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_three_host_steps_make_a_serving_ring(tmp_path: Path) -> None:
    require_hosts()
    page = blocks()
    secrets = [b for b in page if b.runs and "openssl" in b.text and "secrets/" in b.text]
    assert len(secrets) == 2  # the secrets, then the CA and certificates
    for block in secrets:
        made = subprocess.run(
            ["bash", "-e", "-c", block.text],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert made.returncode == 0, (block.where, made.stderr)
    toml = [b for b in page if b.language == "toml"]
    coordinator = one([b for b in toml if "models =" in b.text], "of coordinator.toml").text
    edge1 = one([b for b in toml if "join =" in b.text], "of node-edge1.toml").text
    edge2 = edge1.replace("edge1", "edge2")  # what the page says node-edge2.toml is
    install(tmp_path, "coordinator", "coordinator.toml", coordinator)
    install(tmp_path, "edge1", "node-edge1.toml", edge1)
    install(tmp_path, "edge2", "node-edge2.toml", edge2)
    make_repo(tmp_path / "coordinator" / "var" / "models")
    start = one(
        [
            b
            for b in page
            if b.skip == "needs-several-hosts" and "appliance coordinator --config" in b.text
        ],
        "starting the members",
    )
    commands = re.findall(r"^appliance (.+?)\s+# on (\w+)\.lan$", start.text, re.MULTILINE)
    assert sorted(host for _, host in commands) == sorted(MEMBERS)
    check = one(
        [
            b
            for b in page
            if b.skip == "needs-several-hosts"
            and "/v2/cluster" in b.text
            and "coordinator.lan:8000" in b.text
        ],
        "checking the ring",
    )
    processes: list[subprocess.Popen[bytes]] = []
    with Hosts([*MEMBERS, "client"]) as hosts:
        hosts.name_hosts({f"{m}.lan": m for m in MEMBERS})
        try:
            for args, host in commands:
                argv = [APPLIANCE, *on_host(tmp_path, host, args).split()]
                log = open(tmp_path / f"{host}.log", "wb")  # noqa: SIM115 - the child's
                processes.append(
                    subprocess.Popen(
                        [*hosts[host].exec_prefix(), *argv], stdout=log, stderr=subprocess.STDOUT
                    )
                )
            ready = (
                "curl -s --fail-with-body --cacert secrets/ca.pem -o /dev/null "
                "https://coordinator.lan:8000/v2/health/ready"
            )
            end = time.monotonic() + 90
            while bash_in(hosts, "client", ready, tmp_path).returncode != 0:
                dead = [p.args for p in processes if p.poll() is not None]
                assert not dead and time.monotonic() < end, (dead, _logs(tmp_path))
                time.sleep(0.5)
            result = bash_in(hosts, "client", check.text, tmp_path)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    assert result.returncode == 0, (result.stdout, result.stderr, _logs(tmp_path))
    for member in ("edge1", "edge2"):  # healthy, at the advertise_url its config gives
        assert f'"address":"https://{member}.lan:9100"' in result.stdout.replace(" ", "")
    assert '"healthy":true' in result.stdout.replace(" ", "")
    assert "last_hidden_state" in result.stdout  # and the ring answered


def _logs(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp.glob("*.log")))
