"""The test-hosts harness itself: namespaces with their own addresses, nothing in the root
namespace, a TLS ring whose members advertise their hosts' addresses, and cleanup."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.faults.common import reference, token_rows
from tests.support.hosts import hosts_ring, require_hosts
from tests.support.hosts_net import PREFIX, Hosts, assert_root_untouched


def _namespaces() -> set[str]:
    listing = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True)
    return {e["name"] for e in json.loads(listing.stdout or "[]")}


def _connects(hosts: Hosts, name: str, address: tuple[str, int]) -> bool:
    with hosts.inside(name):
        try:
            socket.create_connection(address, timeout=1).close()
        except OSError:
            return False
    return True


def test_hosts_have_their_own_addresses_and_are_removed_at_the_end() -> None:
    require_hosts()
    with Hosts(["a", "b"]) as hosts:
        made = {n for n in _namespaces() if n.startswith(f"{PREFIX}{hosts.run}-")}
        assert made == {hosts.bridge, hosts["a"].ns, hosts["b"].ns}
        with hosts.inside("b"):
            server = socket.create_server((hosts["b"].address, 0))
        port = server.getsockname()[1]
        with server:
            assert _connects(hosts, "a", (hosts["b"].address, port))
            assert_root_untouched()
            hosts.pull("b")
            assert not _connects(hosts, "a", (hosts["b"].address, port))  # hangs: timeout
            hosts.plug("b")
            assert _connects(hosts, "a", (hosts["b"].address, port))
    assert not {n for n in _namespaces() if n.startswith(f"{PREFIX}{hosts.run}-")}


@pytest.mark.slow
def test_a_tls_ring_on_hosts_serves_and_members_advertise_their_own_address(
    tmp_path: Path,
) -> None:
    require_hosts()
    with hosts_ring(tmp_path, ["n1", "n2"], stages=2, replicas=1,
                    coordinator=("--link-probe-interval-s", "1")) as ring:  # fmt: skip
        assert ring.url.startswith("https://198.18.")
        nodes = {n["node_id"]: n for n in ring.cluster()["nodes"]}
        for node_id, host in ring.node_hosts.items():
            assert nodes[node_id]["address"] == f"https://{ring.hosts[host].address}:9100"
        rows = token_rows(4)
        with ring.load(rows, 2, 20) as load:
            tally = load.join()
        assert tally.ok == 20, tally.errors
        assert np.asarray(reference(rows[0])).shape[-1] == 64
        # the coordinator's probes measure the links: one cut down to 8 Mbit/s shows it
        ring.hosts.limit(ring.node_hosts["n2"], rate="8mbit", burst="16kb")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            links = {r["to"]: r for r in ring.cluster()["links"] if r["from"] == "coordinator"}
            slow = links.get("n2", {}).get("probe_throughput_mbit_s")
            if slow is not None and slow < 12:
                break
            time.sleep(0.5)
        assert slow is not None and slow < 12, links
        assert links["n1"]["probe_throughput_mbit_s"] > 50, links
        assert_root_untouched()


def test_namespaces_of_a_run_that_is_gone_are_removed_first() -> None:
    require_hosts()
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid names a run whose process no longer exists
    stale = f"{PREFIX}{gone.pid}x0000-left-over"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with Hosts(["a"]) as hosts:
            names = _namespaces()
            assert stale not in names
            assert hosts["a"].ns in names  # this run's, alive
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


def test_without_namespaces_a_test_skips_but_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tests.support.hosts as module

    monkeypatch.setattr(module, "unavailable_reason", lambda need_nft=False: "not root")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="not root"):
        require_hosts()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true.*not root"):
        require_hosts()


def test_a_limited_link_carries_no_more_than_its_rate() -> None:
    require_hosts()
    with Hosts(["a", "b"]) as hosts:
        hosts.limit("b", rate="8mbit", burst="16kb")  # 1 MB/s each way
        shown = subprocess.run([*hosts["b"].exec_prefix(), "tc", "qdisc", "show", "dev", "eth0"],
                               capture_output=True, text=True).stdout  # fmt: skip
        assert "tbf" in shown and "8Mbit" in shown, shown
        with hosts.inside("b"):
            server = socket.create_server((hosts["b"].address, 0))
        size, got = 600_000, []

        def receive() -> None:
            conn, _ = server.accept()
            started, total = time.monotonic(), 0
            while chunk := conn.recv(65536):
                total += len(chunk)
            got.append((total, time.monotonic() - started))
            conn.close()

        reader = threading.Thread(target=receive)
        reader.start()
        with hosts.inside("a"), socket.create_connection(server.getsockname(), timeout=10) as c:
            c.sendall(b"x" * size)
        reader.join(timeout=30)
        server.close()
        total, seconds = got[0]
        assert total == size
        assert seconds > 0.4, seconds  # 600 kB at 1 MB/s: about 0.6 s (unlimited: milliseconds)
