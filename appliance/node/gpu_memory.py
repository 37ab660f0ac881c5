"""GPU memory for /metrics where there is a GPU: NVML (nvidia-ml-py, the ``gpu`` extra) or,
without it, ``nvidia-smi``; nothing at all on a machine without NVIDIA GPUs.

Read at scrape time only (a scrape every few seconds, never the hot path). onnxruntime's CUDA
arena keeps what it allocated, so "used" is what the node holds, not what its last run needed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    used_bytes: int
    total_bytes: int
    process_bytes: int | None = None  # this process's share, where the driver says


def parse_smi_csv(text: str) -> list[GpuMemory]:
    """``nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader,
    nounits`` output (MiB) as GpuMemory rows; lines that do not parse are skipped."""
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            index, used, total = int(parts[0]), int(parts[2]), int(parts[3])
        except ValueError:
            continue
        rows.append(GpuMemory(index, parts[1], used << 20, total << 20))
    return rows


def _from_nvml() -> list[GpuMemory] | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        rows = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            mine = sum(
                p.usedGpuMemory or 0
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.pid == os.getpid()
            )
            name = pynvml.nvmlDeviceGetName(handle)
            rows.append(
                GpuMemory(
                    index,
                    name.decode() if isinstance(name, bytes) else str(name),
                    int(info.used),
                    int(info.total),
                    int(mine),
                )
            )
        return rows
    except pynvml.NVMLError as exc:
        log.debug("NVML query failed: %s", exc)
        return None
    finally:
        pynvml.nvmlShutdown()


def gpu_memory() -> list[GpuMemory]:
    """Every NVIDIA GPU's memory, or [] where there is none (or no way to ask)."""
    rows = _from_nvml()
    if rows is not None:
        return rows
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [
                smi,
                "--query-gpu=index,name,memory.used,memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi failed: %s", exc)
        return []
    return parse_smi_csv(out)
