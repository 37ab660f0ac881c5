"""The deployment files (deploy/, appliance/systemd/), checked where no cluster, image build or
systemd runs: the Kubernetes schemas offline, every appliance setting they pass exists, the
readiness design cannot deadlock, memory limits match the budget, the Containerfile's stages,
and ``systemd-analyze verify`` of the units as ``appliance install-units`` writes them."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from appliance.config import CoordinatorConfig, NodeConfig
from appliance.units import UnitSettings, install_units

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
K8S_VERSION = "1.37.0"  # the newest schemas kubernetes-validate ships
CLASSES: dict[str, type[Any]] = {"node": NodeConfig, "coordinator": CoordinatorConfig}
NOT_SETTINGS = {"config"}  # flags of the commands that are no config field


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests() if d["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def fields(cls: type[Any]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def flag_settings(args: list[str]) -> tuple[str, set[str]]:
    """The appliance command of ``args`` and the settings its ``--flags`` name."""
    if args and args[0].endswith("appliance"):
        args = args[1:]
    command = args[0]
    flags = {a[2:].split("=", 1)[0].replace("-", "_") for a in args if a.startswith("--")}
    return command, flags - NOT_SETTINGS


def test_manifests_pass_the_kubernetes_schemas_strictly() -> None:
    docs = manifests()
    assert {d["kind"] for d in docs} >= {
        "Deployment", "Service", "StatefulSet", "PodDisruptionBudget", "Secret", "ConfigMap",
    }  # fmt: skip
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any error


def test_the_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk


def _containers() -> list[dict[str, Any]]:
    pods = [
        d["spec"]["template"]["spec"]
        for d in manifests()
        if d["kind"] in ("Deployment", "StatefulSet")
    ]
    return [c for pod in pods for c in pod["containers"]]


def test_every_setting_the_manifests_pass_exists() -> None:
    config = named("ConfigMap", "appliance-config")["data"]
    assert set(config) == {"coordinator.toml", "node.toml"}
    for name, text in config.items():
        keys = set(tomllib.loads(text))
        unknown = keys - fields(CLASSES[name.removesuffix(".toml")])
        assert not unknown, f"{name}: {unknown} are no settings"
    for container in _containers():
        command, flags = flag_settings(container["args"])
        assert not flags - fields(CLASSES[command]), (container["name"], flags)
        config_file = container["args"][container["args"].index("--config") + 1]
        mounts = {m["mountPath"]: m.get("subPath") for m in container["volumeMounts"]}
        assert mounts[config_file] == f"{command}.toml"  # the file it reads is the ConfigMap's


def test_every_setting_the_containerfile_and_the_units_pass_exists(tmp_path: Path) -> None:
    cmd = re.findall(r"^CMD (\[.*\])$", CONTAINERFILE.read_text(), re.MULTILINE)
    commands = [yaml.safe_load(c) for c in cmd]
    for path in install_units(tmp_path, UnitSettings(python=sys.executable)):
        start = re.search(r"^ExecStart=(.*)$", path.read_text(), re.MULTILINE)
        assert start, path
        argv = shlex.split(start.group(1))
        commands.append(argv[argv.index("appliance.cli") + 1 :])
    checked = 0
    for argv in commands:
        if argv[0] in CLASSES:
            command, flags = flag_settings(argv)
            assert not flags - fields(CLASSES[command]), argv
            checked += 1
    assert checked == 3  # the node image's CMD, both units


def test_readiness_cannot_deadlock_joining() -> None:
    # nodes join through a Service that lists the coordinator before it is ready
    join = named("Service", "appliance-join")
    assert join["spec"]["publishNotReadyAddresses"] is True
    node_toml = tomllib.loads(named("ConfigMap", "appliance-config")["data"]["node.toml"])
    assert node_toml["join"].split(":")[0] == "appliance-join"
    coordinator = named("Deployment", "appliance-coordinator")["spec"]["template"]["metadata"]
    assert join["spec"]["selector"].items() <= coordinator["labels"].items()
    # the clients' Service is readiness-gated (no publishNotReadyAddresses)
    assert not named("Service", "appliance")["spec"].get("publishNotReadyAddresses")
    # nodes: all start at once, each reachable at its advertise_url while not yet ready
    nodes = named("StatefulSet", "appliance-node")
    assert nodes["spec"]["podManagementPolicy"] == "Parallel"
    headless = named("Service", nodes["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    args = nodes["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--node-id") + 1] == "$(POD_NAME)"  # stable id: the pod's name
    advertise = args[args.index("--advertise-url") + 1]
    assert advertise.startswith(f"https://$(POD_NAME).{nodes['spec']['serviceName']}.")


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6,
             "G": 10**9}  # fmt: skip
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity)
    assert match, quantity
    return int(float(match.group(1)) * units.get(match.group(2), 1))


def test_node_memory_limits_match_the_memory_budget() -> None:
    budget = tomllib.loads(named("ConfigMap", "appliance-config")["data"]["node.toml"])[
        "memory_budget"
    ]
    resources = named("StatefulSet", "appliance-node")["spec"]["template"]["spec"]["containers"][0][
        "resources"
    ]
    limit = _bytes(resources["limits"]["memory"])
    assert _bytes(resources["requests"]["memory"]) == limit  # scheduled for what it may use
    # spans are counted at 1.15 x their bytes + 150 MB (kv_budget_bytes' rule), plus the process
    assert limit >= budget * 1.15 + (512 << 20), (budget, limit)
    assert limit <= budget * 2, "a limit far above the budget wastes the host's memory"


def test_the_disruption_budget_keeps_a_replica_of_every_span() -> None:
    nodes = named("StatefulSet", "appliance-node")
    pdb = named("PodDisruptionBudget", "appliance-node")["spec"]
    labels = nodes["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    replicas = tomllib.loads(named("ConfigMap", "appliance-config")["data"]["coordinator.toml"])[
        "replicas"
    ]
    assert pdb["maxUnavailable"] < replicas  # a drain never takes every replica of a span


def _stages() -> dict[str, str]:
    """Containerfile stage name -> its text (FROM line included)."""
    text = CONTAINERFILE.read_text()
    parts = re.split(r"^(?=FROM )", text, flags=re.MULTILINE)[1:]
    stages = {}
    for part in parts:
        match = re.match(r"FROM (\S+) AS (\S+)", part)
        assert match, part.splitlines()[0]
        stages[match.group(2)] = part
    return stages


def _instructions(stage: str) -> str:
    return "\n".join(ln for ln in stage.splitlines() if not ln.lstrip().startswith("#"))


def test_the_containerfile_node_stage_has_no_torch_and_export_adds_it() -> None:
    stages = _stages()
    assert list(stages) == ["build", "node", "export"]
    node = _instructions(stages["node"]).lower()
    assert "torch" not in node and "[export]" not in node and "pip install" in node
    assert "user appliance" in node and 'entrypoint ["appliance"]' in node
    export = _instructions(stages["export"])
    assert export.startswith("FROM node AS export") and "onnx-appliance[export]" in export
    # the build stage copies every package the wheel holds
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = set(re.findall(r"^COPY (\w+) \1$", stages["build"], re.MULTILINE))
    assert copied == packages


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing")
def test_the_systemd_units_verify(tmp_path: Path) -> None:
    written = install_units(tmp_path, UnitSettings(python=sys.executable, memory_max="8G"))
    template = tmp_path / "appliance-node@.service"
    instance = tmp_path / "appliance-node@edge1.service"  # verify needs an instance
    instance.write_text(template.read_text())
    units = [str(p) for p in written if p != template] + [str(instance)]
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # unknown keys and unparsable values are only warnings to systemd (exit 0): refuse them too
    complaints = [
        ln for ln in (result.stdout + result.stderr).splitlines()
        if "appliance" in ln and re.search(r"ignoring|Unknown|Failed|not executable", ln)
    ]  # fmt: skip
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
