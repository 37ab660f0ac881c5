"""The coordinator's status page, rendered by headless Chromium against a running 3-node ring."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_ring import make_repo
from tests.support.harness import Ring

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)"),
]
# the flags keep Chromium off this machine's closed network (it stalls otherwise)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=6000",
]


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def ring(tmp_path: Path) -> Iterator[Ring]:
    ring = Ring(tmp_path, make_repo(tmp_path / "repo"))
    ring.start_coordinator()
    for node in ("edge-a", "edge-b", "edge-c"):
        ring.start_node(node)
    ring.wait_members(3)
    ring.load("demo", stages=3, replicas=1)
    ring.wait_ready()
    yield ring
    ring.stop()


def test_the_status_page_shows_the_nodes_and_spans_of_a_running_ring(
    ring: Ring, tmp_path: Path
) -> None:
    dom = chromium(ring.url + "/", tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for node in ("edge-a", "edge-b", "edge-c"):
        assert node in dom.stdout
    assert "3 / 3" in dom.stdout and "placement v1" in dom.stdout
    assert dom.stdout.count('class="span">demo ') == 3  # one span held per node
    shot = tmp_path / "status.png"
    done = chromium(
        ring.url + "/", tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,720"
    )
    assert done.returncode == 0 and shot.stat().st_size > 10_000
