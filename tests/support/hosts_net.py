"""Test hosts: network namespaces with their own addresses, joined by a bridge, and the faults
a real network has (a pulled cable, a slow link, lost packets, partitions, a skewed clock).

Every host is a namespace ``aph-<run>-<name>`` with one interface ``eth0`` holding an address in
198.18.0.0/15 (the range set aside for benchmarking networks); its cable is a veth pair whose
other end is a port of the bridge ``br0`` in the namespace ``aph-<run>-bridge``. The veth pairs are
made inside those namespaces (``ip -n``), so the root namespace never holds a link, an address, a
route, an nft table or a tc qdisc of the test; ``assert_root_untouched`` checks the routes.

The run id starts with this process's pid: namespaces of a run whose process is gone are stale and
removed first (with what still runs in them), those of a run still going (another pytest) are
left alone. Everything made is removed by ``close()`` (the ``with`` block's end, and atexit after
a crash). Outside the namespaces only files are made: /etc/netns/<namespace>/hosts when hosts
get names (``name_hosts``), removed with their namespace.

The faults: ``pull``/``plug`` (the bridge port goes down: TCP hangs, nothing resets it),
``limit`` (tc tbf on both ends of a cable; this kernel has no netem, so no delay), ``loss`` and
``partition`` (nftables rules in the host's own table, both ways or one way, with counters:
``dropped``), ``readdress`` (the host moved); a skewed clock is tests/support/hosts_clock.py's.
``inside`` runs this thread in a host, for clients.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "aph-"
SUBNET = ipaddress.ip_network("198.18.0.0/15")
NETNS_DIR = Path("/var/run/netns")
ETC_NETNS = Path("/etc/netns")  # per-namespace /etc files of `ip netns exec`
CLONE_NEWNET = 0x40000000
TABLE = "aph"  # the nft table a host's faults live in (one per host namespace)


class HostsUnavailable(RuntimeError):
    """This machine cannot make test hosts (not root, no iproute2, no namespaces)."""


def unavailable_reason(need_nft: bool = False) -> str:
    """Why test hosts cannot be made here ("" when they can)."""
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces)"
    if shutil.which("ip") is None:
        return "test hosts need iproute2 (the ip command)"
    if need_nft and shutil.which("nft") is None:
        return "loss and partitions need nftables (the nft command)"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    _run("ip", "netns", "del", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    return ""


def _run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise HostsUnavailable(f"{' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _operstate(ns: str, dev: str) -> str:
    """A link's operational state in namespace ``ns`` (UP, DOWN, LOWERLAYERDOWN, ...)."""
    shown = _run("ip", "-n", ns, "-j", "link", "show", "dev", dev, check=False)
    try:
        return str(json.loads(shown.stdout or "[]")[0].get("operstate", ""))
    except (ValueError, IndexError, AttributeError):
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete(ns: str) -> None:
    """Kill what still runs in the namespace (by pid: only processes a run of this harness
    started live there), then delete it and its /etc files."""
    pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run("ip", "netns", "del", ns, check=False)
    shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose process is gone; their names."""
    removed = []
    listing = _run("ip", "-j", "netns", "list", check=False).stdout.strip()
    for entry in json.loads(listing or "[]"):
        name = entry["name"]
        if not name.startswith(PREFIX):
            continue
        pid_part = name[len(PREFIX) :].split("x", 1)[0]
        if pid_part.isdigit() and not _alive(int(pid_part)):
            _delete(name)
            removed.append(name)
    for folder in ETC_NETNS.glob(f"{PREFIX}*"):
        pid_part = folder.name[len(PREFIX) :].split("x", 1)[0]
        if pid_part.isdigit() and not _alive(int(pid_part)):
            shutil.rmtree(folder, ignore_errors=True)
    return removed


def assert_root_untouched() -> None:
    """The root namespace has no route and no address in 198.18.0.0/15 (a default route, which
    no test adds, is not one: it does not name the range)."""
    routes = json.loads(_run("ip", "-j", "route", "show", "table", "all").stdout or "[]")
    for route in routes:
        dst = route.get("dst", "")
        if dst in ("default", "") or ":" in dst:
            continue
        net = ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False)
        assert not net.overlaps(SUBNET), (
            f"the root namespace has a route to the test range: {route}"
        )
    addresses = json.loads(_run("ip", "-j", "-4", "addr", "show").stdout or "[]")
    for link in addresses:
        for info in link.get("addr_info", []):
            assert ipaddress.ip_address(info["local"]) not in SUBNET, f"root address: {info}"


@dataclass
class Host:
    name: str
    ns: str
    address: str
    port: str  # its cable's end on the bridge (in the bridge namespace)

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


@dataclass
class Hosts:
    """``names`` as hosts on one bridge; use as ``with Hosts([...]) as hosts:``."""

    names: list[str]
    run: str = field(default_factory=lambda: f"{os.getpid()}x{secrets.token_hex(2)}")
    hosts: dict[str, Host] = field(default_factory=dict)
    _made: list[str] = field(default_factory=list)
    _spare: int = 200  # addresses handed out by readdress() start here

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.run}-bridge"

    def __enter__(self) -> Hosts:
        remove_stale()
        atexit.register(self.close)
        try:
            self._make()
            assert_root_untouched()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def _netns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _make(self) -> None:
        self._netns(self.bridge)
        _run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.bridge, "link", "set", "br0", "up")
        for index, name in enumerate(self.names):
            ns = f"{PREFIX}{self.run}-{name}"
            self._netns(ns)
            port = f"p{index}"
            address = str(SUBNET.network_address + 10 + index)
            _run("ip", "-n", self.bridge, "link", "add", port, "type", "veth",
                 "peer", "name", "eth0", "netns", ns)  # fmt: skip
            _run("ip", "-n", self.bridge, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{address}/{SUBNET.prefixlen}", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            self.hosts[name] = Host(name, ns, address, port)

    def name_hosts(self, names: dict[str, str]) -> None:
        """Host names every host resolves (``{"edge1.lan": "edge1"}``): an /etc/hosts of each
        namespace, which ``ip netns exec`` mounts over /etc/hosts for what it runs."""
        lines = "".join(f"{self[host].address} {name}\n" for name, host in names.items())
        for host in self.hosts.values():
            folder = ETC_NETNS / host.ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("127.0.0.1 localhost\n" + lines)

    def close(self) -> None:
        for ns in reversed(self._made):
            _delete(ns)
        self._made.clear()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    # --- faults ---------------------------------------------------------------------------

    def pull(self, name: str) -> None:
        """Pull the host's cable: its bridge port goes down; TCP to and from it hangs."""
        _run("ip", "-n", self.bridge, "link", "set", self[name].port, "down")

    def plug(self, name: str) -> None:
        """Plug the cable back in; returns once both ends of it report carrier (up to 3 s): a
        veth pair set up takes a moment to pass frames, and a connection tried at once failed
        (one run in a suite of hundreds)."""
        port = self[name].port
        _run("ip", "-n", self.bridge, "link", "set", port, "up")
        end = time.monotonic() + 3
        while time.monotonic() < end:
            states = [_operstate(self.bridge, port), _operstate(self[name].ns, "eth0")]
            if states == ["UP", "UP"]:
                return
            time.sleep(0.02)

    def limit(self, name: str, rate: str = "1gbit", burst: str = "256kb") -> None:
        """A token bucket on both ends of the host's cable: ``rate`` each way."""
        for ns, dev in ((self[name].ns, "eth0"), (self.bridge, self[name].port)):
            _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                 "rate", rate, "burst", burst, "latency", "50ms")  # fmt: skip

    def _table(self, name: str) -> None:
        ns = self[name].ns
        _run("ip", "netns", "exec", ns, "nft", "add", "table", "inet", TABLE)
        for chain, hook in (("in", "input"), ("out", "output")):
            _run("ip", "netns", "exec", ns, "nft", "add", "chain", "inet", TABLE, chain,
                 f"{{ type filter hook {hook} priority 0; }}")  # fmt: skip

    def _rule(self, name: str, chain: str, *rule: str) -> None:
        self._table(name)
        _run("ip", "netns", "exec", self[name].ns, "nft", "add", "rule", "inet", TABLE, chain,
             *rule)  # fmt: skip

    def loss(self, name: str, percent: int) -> None:
        """Drop ``percent`` % of the host's packets, each way (nft numgen, in its namespace)."""
        for chain in ("in", "out"):
            self._rule(name, chain, "numgen", "random", "mod", "100", "<", str(percent),
                       "counter", "drop")  # fmt: skip

    def partition(self, name: str, others: list[str], both_ways: bool = True) -> None:
        """Nothing from ``name`` reaches ``others`` (and, both ways, nothing of theirs reaches it);
        one way, their packets still arrive but no answer leaves."""
        for other in others:
            address = self[other].address
            self._rule(name, "out", "ip", "daddr", address, "counter", "drop")
            if both_ways:
                self._rule(name, "in", "ip", "saddr", address, "counter", "drop")

    def dropped(self, name: str) -> int:
        """Packets the host's loss and partition rules dropped so far (proof they were hit)."""
        listing = _run("ip", "netns", "exec", self[name].ns, "nft", "-j", "list", "table",
                       "inet", TABLE, check=False)  # fmt: skip
        if listing.returncode != 0:
            return 0
        total = 0
        for item in json.loads(listing.stdout)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    total += int(expr["counter"]["packets"])
        return total

    def heal(self, name: str) -> None:
        """Remove the host's loss and partition rules."""
        if shutil.which("nft") is None:
            return
        _run("ip", "netns", "exec", self[name].ns, "nft", "delete", "table", "inet", TABLE,
             check=False)  # fmt: skip

    def readdress(self, name: str) -> str:
        """Give the host a new address (its old one is gone): it moved."""
        host = self[name]
        new = str(SUBNET.network_address + self._spare)
        self._spare += 1
        _run(
            "ip", "-n", host.ns, "addr", "del", f"{host.address}/{SUBNET.prefixlen}", "dev", "eth0"
        )
        _run("ip", "-n", host.ns, "addr", "add", f"{new}/{SUBNET.prefixlen}", "dev", "eth0")
        host.address = new
        return new

    def spare_addresses(self, count: int = 4) -> list[str]:
        """The addresses readdress() will hand out (for certificates made beforehand)."""
        return [str(SUBNET.network_address + self._spare + i) for i in range(count)]

    # --- this process inside a host -------------------------------------------------------

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        """Run this thread (and the threads it starts) in the host's namespace: sockets it opens
        are the host's. Leaves the thread where it was afterwards."""
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(NETNS_DIR / self[name].ns, os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise HostsUnavailable(f"setns into {name}: errno {ctypes.get_errno()}")
            yield
        finally:
            libc.setns(home, CLONE_NEWNET)
            os.close(home)
            os.close(target)
