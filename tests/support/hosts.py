"""A ring on test hosts: a coordinator and nodes, each in a network namespace of its own with its
own address, started with ``ip netns exec``, over mutual TLS with signed hops; the clients run
in a host of their own (``client``), so every request crosses the bridge as on a LAN.

    with hosts_ring(tmp_path, ["n1", "n2", "n3", "n4"], stages=2, replicas=2) as ring:
        ring.hosts.pull("n1")          # tools of tests/support/hosts_net.py
        with ring.load(rows, 8, 10_000) as load: ...

Needs root and iproute2; ``require_hosts()`` skips a test without them, or fails it with
``CI=true``, where a machine that cannot make namespaces is a broken CI machine.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.faults.common import Load, answer_matches, make_repo, post
from tests.support.harness import coordinator_args, http
from tests.support.hosts_clock import clock_offset_env
from tests.support.hosts_net import Hosts, unavailable_reason

NODE_PORT = 9100
COORDINATOR_PORT = 8000
HEARTBEAT_S = 0.3
ROOT = Path(__file__).resolve().parents[2]


def require_hosts(need_nft: bool = False) -> None:
    import pytest  # here: bench/ uses this module without pytest

    reason = unavailable_reason(need_nft)
    if not reason:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and test hosts cannot be made: {reason}")
    pytest.skip(reason)


def openssl(*args: str) -> None:
    # an hour in the past (where the clock shim is built): a host whose clock is behind must
    # not find the certificates not yet valid
    env = {**os.environ, **clock_offset_env(-3600)}
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, env=env)


def make_pki(folder: Path, addresses: list[str]) -> dict[str, str]:
    """A throwaway CA and one member certificate naming every one of ``addresses`` (the hosts'
    and the spare ones a moved host may take), signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (
        str(folder / n) for n in ("ca.key", "ca.pem", "host.key", "host.csr", "host.pem")
    )
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
            "-days", "1", "-subj", "/CN=appliance test-hosts CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
            "-subj", "/CN=appliance test host")  # fmt: skip
    ext = folder / "ext.cnf"
    names = ",".join(f"IP:{a}" for a in addresses)
    ext.write_text(f"subjectAltName={names}\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "1", "-extfile", str(ext))  # fmt: skip
    return {"ca": ca, "cert": cert, "key": key}


@dataclass
class HostRing:
    hosts: Hosts
    work: Path
    repo: Path
    pki: dict[str, str]
    coordinator_host: str = "coord"
    client_host: str = "client"
    coordinator: subprocess.Popen[str] | None = None
    nodes: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    node_hosts: dict[str, str] = field(default_factory=dict)  # node id -> its host
    node_args: tuple[str, ...] = ()  # more flags for every node (later flags win)

    @property
    def url(self) -> str:
        return f"https://{self.hosts[self.coordinator_host].address}:{COORDINATOR_PORT}"

    def tls(self) -> list[str]:
        secrets = self.work / "cluster-secrets"
        if not secrets.exists():
            secrets.write_text(os.urandom(32).hex() + "\n")
            secrets.chmod(0o600)
        return ["--tls-cert", self.pki["cert"], "--tls-key", self.pki["key"],
                "--tls-ca", self.pki["ca"], "--cluster-secrets-file", str(secrets)]  # fmt: skip

    def _start(
        self, host: str, args: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        handle = open(log, "a")  # noqa: SIM115 - the process owns it until it exits
        process = subprocess.Popen(
            [*self.hosts[host].exec_prefix(), sys.executable, "-m", "appliance.cli", *args],
            stdout=subprocess.PIPE,
            stderr=handle,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        if not re.search(r"https://\S+", line):
            process.kill()
            process.wait()
            raise AssertionError(f"no listening line from {args[0]} on {host}: {line!r}; see {log}")
        return process

    def start_coordinator(self, *extra: str) -> None:
        address = self.hosts[self.coordinator_host].address
        self.coordinator = self._start(
            self.coordinator_host,
            coordinator_args(
                self.repo, self.work, COORDINATOR_PORT, "--host", address, *self.tls(), *extra
            ),
            self.work / "coordinator.log",
        )

    def start_node(self, host: str, node_id: str = "", env: dict[str, str] | None = None) -> None:
        """A node on ``host``, listening on and advertising the host's own address."""
        node_id = node_id or host
        address = self.hosts[host].address
        coordinator = self.hosts[self.coordinator_host].address
        self.nodes[node_id] = self._start(
            host,
            [
                "node",
                "--host",
                address,
                "--port",
                str(NODE_PORT),
                "--advertise-url",
                f"https://{address}:{NODE_PORT}",
                "--join",
                f"{coordinator}:{COORDINATOR_PORT}",
                "--node-id",
                node_id,
                "--model-repo",
                str(self.work / node_id),
                "--intra-op-threads",
                "1",
                "--heartbeat-interval-s",
                str(HEARTBEAT_S),
                "--min-attempt-s",
                "0.5",
                "--log-level",
                "info",
                *self.tls(),
                *self.node_args,
            ],
            self.work / f"{node_id}.log",
            env,
        )
        self.node_hosts[node_id] = host

    def http(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        """One call from the client host; (status, JSON body)."""
        with self.hosts.inside(self.client_host):
            return http(method, self.url + path, body, timeout=timeout)

    def cluster(self) -> dict[str, Any]:
        status, view = self.http("GET", "/v2/cluster")
        assert status == 200, view
        return dict(view)

    def wait_members(self, count: int, timeout_s: float = 60) -> dict[str, Any]:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                view = self.cluster()
                if sum(n["healthy"] for n in view["nodes"]) >= count:
                    return view
            time.sleep(0.1)
        raise AssertionError(f"{count} members did not join in {timeout_s}s; see {self.work}")

    def wait_ready(self, timeout_s: float = 60) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                if self.http("GET", "/v2/health/ready", timeout=5)[0] == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"coordinator not ready in {timeout_s}s")

    def place(self, stages: int, replicas: int, model: str = "demo") -> None:
        status, body = self.http(
            "POST",
            f"/v2/repository/models/{model}/load",
            {"parameters": {"stages": stages, "replicas": replicas}},
            timeout=120,
        )
        assert status == 200, body

    @contextlib.contextmanager
    def load(
        self, inputs: list[Any], concurrency: int, limit: int, **options: Any
    ) -> Iterator[TimedLoad]:
        """A load of ``concurrency`` clients, its threads started in the client host."""
        load = TimedLoad(self.url, inputs, concurrency, limit, **options)
        with self.hosts.inside(self.client_host):
            load.__enter__()
        try:
            yield load
        finally:
            load.stop()

    def kill_node(self, node_id: str) -> None:
        """SIGKILL: the node leaves no goodbye (a host that lost power)."""
        process = self.nodes.pop(node_id)
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def stop_node(self, node_id: str, timeout_s: float = 10) -> None:
        _stop([self.nodes.pop(node_id)], timeout_s)

    def stop(self) -> None:
        _stop(list(self.nodes.values()), 10)
        self.nodes.clear()
        if self.coordinator is not None:
            _stop([self.coordinator], 10)
            self.coordinator = None


def _stop(processes: list[subprocess.Popen[str]], timeout_s: float) -> None:
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    end = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


class TimedLoad(Load):
    """The faults' Load, each answer also kept as (sent at, seconds, right) for windows."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answers: list[tuple[float, float, bool]] = []

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                index = self._next
                self._next += 1
            if index >= self.limit:
                return
            body, headers = self.requests[index % len(self.requests)]
            sent = time.monotonic()
            answer = post(self.url, body, {**headers, **self.headers})
            expected = answer_matches(answer, self.wants[index % len(self.wants)])
            with self._lock:
                self.tally.add(answer, expected)
                self.answers.append((sent, answer.seconds, expected))

    def window(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        """Answers to requests in flight at some time in [start, end]."""
        return [a for a in self.answers if a[0] <= end and a[0] + a[1] >= start]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


@contextlib.contextmanager
def trusting(ca: str) -> Iterator[None]:
    """urllib's default HTTPS context trusts the test CA (the faults' Load and harness.http build
    theirs per connection)."""
    saved = ssl._create_default_https_context
    ssl._create_default_https_context = functools.partial(ssl.create_default_context, cafile=ca)
    try:
        yield
    finally:
        ssl._create_default_https_context = saved


@contextlib.contextmanager
def hosts_ring(
    work: Path,
    nodes: list[str],
    stages: int,
    replicas: int,
    node_env: dict[str, dict[str, str]] | None = None,
    coordinator: tuple[str, ...] = (),
    repo: Callable[[Path], Path] = make_repo,
    model: str = "demo",
    node_args: tuple[str, ...] = (),
) -> Iterator[HostRing]:
    """A coordinator, ``nodes`` and a client, each a host, ``model`` of the repository that
    ``repo`` makes (the small demo model) placed."""
    work.mkdir(parents=True, exist_ok=True)
    with Hosts(["coord", "client", *nodes]) as hosts:
        # 127.0.0.1 too: bench/hosts.py's loopback ring uses the same certificate
        addresses = [h.address for h in hosts.hosts.values()] + hosts.spare_addresses()
        pki = make_pki(work / "pki", [*addresses, "127.0.0.1"])
        ring = HostRing(hosts, work, repo(work / "repo"), pki, node_args=node_args)
        with trusting(pki["ca"]):
            try:
                ring.start_coordinator(*coordinator)
                for node in nodes:
                    ring.start_node(node, env=(node_env or {}).get(node))
                ring.wait_members(len(nodes))
                ring.place(stages, replicas, model)
                ring.wait_ready()
                yield ring
            finally:
                for name in hosts.names:  # faults off, so leaving nodes can say goodbye
                    hosts.plug(name)
                    hosts.heal(name)
                ring.stop()
