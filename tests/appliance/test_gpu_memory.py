"""GPU memory on /metrics: parsed from the driver's own tools; absent without a GPU."""

from __future__ import annotations

import shutil

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from appliance.node.gpu_memory import GpuMemory, gpu_memory, parse_smi_csv
from appliance.node.metrics import gpu_memory_metrics

SMI = "0, NVIDIA H200, 1234, 143771\n1, NVIDIA H200, 0, 143771\nbad line\n"


def test_nvidia_smi_output_is_read_in_bytes() -> None:
    assert parse_smi_csv(SMI) == [
        GpuMemory(0, "NVIDIA H200", 1234 << 20, 143771 << 20),
        GpuMemory(1, "NVIDIA H200", 0, 143771 << 20),
    ]


def _scrape(gpus: list[GpuMemory]) -> dict[tuple[str, str], float]:
    class Gpus(Collector):
        def collect(self):
            yield from gpu_memory_metrics(gpus)

    registry = CollectorRegistry()
    registry.register(Gpus())
    text = generate_latest(registry).decode()
    return {
        (s.labels["gpu"], s.labels["what"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "appliance_gpu_memory_bytes"
    }


def test_the_metric_has_used_total_and_this_process_per_gpu() -> None:
    gpus = [GpuMemory(0, "H200", 5 << 30, 140 << 30, 3 << 30), *parse_smi_csv(SMI)[1:]]
    assert _scrape(gpus) == {
        ("0", "used"): 5 << 30,
        ("0", "total"): 140 << 30,
        ("0", "process"): 3 << 30,
        ("1", "used"): 0,
        ("1", "total"): 143771 << 20,
    }
    assert _scrape([]) == {}  # no GPU: no family at all, not zeros


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_a_machine_without_a_gpu_reports_none() -> None:
    assert gpu_memory() == []


@pytest.mark.gpu
def test_a_gpu_machine_reports_its_memory() -> None:
    gpus = gpu_memory()
    if not gpus:
        pytest.skip("no NVIDIA GPU here")
    assert all(g.total_bytes > 0 and 0 <= g.used_bytes <= g.total_bytes for g in gpus)
