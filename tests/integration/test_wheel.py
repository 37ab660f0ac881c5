"""The built wheel, installed without extras in a fresh venv, is whole: its systemd units ship
inside it, a node and a coordinator import without torch or transformers, and the project's
benchmarks and tests stay out of it."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel built from this checkout (and its base dependencies)."""
    work = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(work.glob("onnx_appliance-*.whl"))
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return python


def run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # not from the checkout: cwd elsewhere and no PYTHONPATH, so only the wheel is importable
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(python), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_install_units_writes_both_units_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    appliance = installed.parent / "appliance"
    done = subprocess.run(
        [str(appliance), "install-units", "--prefix", str(tmp_path / "units"), "--user", "svc"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    node = (tmp_path / "units" / "appliance-node@.service").read_text()
    coordinator = (tmp_path / "units" / "appliance-coordinator.service").read_text()
    assert f"ExecStart={installed} -m appliance.cli node" in node
    assert "User=svc" in node and "Type=notify" in node
    assert f"ExecStart={installed} -m appliance.cli coordinator" in coordinator
    assert "@PYTHON@" not in node + coordinator


def test_servers_import_without_torch_and_bench_is_not_shipped(
    installed: Path, tmp_path: Path
) -> None:
    probe = (
        "import sys, importlib.util\n"
        "import appliance.cli, appliance.node.server, appliance.coordinator.app\n"
        "import runtime.registry, runtime.codec, cache.result_cache\n"
        "heavy = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert importlib.util.find_spec('bench') is None, 'bench is in the wheel'\n"
        "assert importlib.util.find_spec('tests') is None, 'tests are in the wheel'\n"
        "print('ok')\n"
    )
    done = run(installed, "-c", probe, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    help_text = run(installed, "-m", "appliance.cli", "--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "serve" in help_text.stdout
