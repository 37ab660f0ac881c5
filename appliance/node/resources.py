"""What a node has to offer: its memory budget, the memory free now, and its speed.

- The budget of a CPU node is ``memory_budget``, else the RAM available at start; of a CUDA
  node its GPU's memory (spans live there). Nodes sharing one host (``appliance serve``) each
  count ``1/memory_share`` of it, so that together they never plan for more than there is.
- Memory free now is read at every heartbeat (RAM available, or the GPU's free memory), also
  divided by the share: the coordinator never places more than a node has left, whatever its
  budget says.
- Speed is GFLOP/s on the fixed calibration graph (runtime.calibration), measured once at
  start with the node's own device and threads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import psutil

from appliance.config import NodeConfig
from appliance.node.gpu_memory import GpuMemory, gpu_memory
from runtime.calibration import measure_speed
from runtime.errors import RuntimeFailure

log = logging.getLogger(__name__)

GPU_READ_INTERVAL_S = 5.0  # NVML (or nvidia-smi) at most this often, not every heartbeat


@dataclass
class NodeResources:
    device: str
    speed_gflops: float
    budget: int
    share: int
    gpu_index: int = 0
    _gpu: tuple[float, GpuMemory | None] = field(default=(0.0, None), repr=False)

    def memory_available(self) -> int:
        """Bytes this node may still use now: its share of the free RAM, or of the free GPU
        memory on a CUDA node (0 where it cannot be read: then only the budget counts)."""
        if self.device != "cuda":
            return psutil.virtual_memory().available // self.share
        gpu = self._read_gpu()
        return (gpu.total_bytes - gpu.used_bytes) // self.share if gpu else 0

    def _read_gpu(self) -> GpuMemory | None:
        read_at, row = self._gpu
        if time.monotonic() - read_at > GPU_READ_INTERVAL_S:
            row = next((g for g in gpu_memory() if g.index == self.gpu_index), None)
            self._gpu = (time.monotonic(), row)
        return row


def node_resources(config: NodeConfig) -> NodeResources:
    settings = config.session_settings()
    share = max(1, config.memory_share)
    try:
        calibration = measure_speed(settings)
        device, speed = calibration.device, calibration.gflops
    except RuntimeFailure as exc:
        if config.device == "cuda":
            raise  # CUDA asked for and not obtained: every span would fail alike; say so now
        log.warning("speed not measured (%s); the coordinator will count this node as average",
                    exc)  # fmt: skip
        device, speed = "cpu", 0.0
    budget = config.memory_budget
    if not budget and device == "cuda":
        gpu = next((g for g in gpu_memory() if g.index == settings.cuda_device_id), None)
        budget = gpu.total_bytes // share if gpu else 0
    if not budget:
        budget = psutil.virtual_memory().available // share
    log.info(
        "device %s, %.1f GFLOP/s on the calibration graph, memory budget %d MiB%s",
        device, speed, budget >> 20, f" (1/{share} of this host)" if share > 1 else "",
    )  # fmt: skip
    return NodeResources(device, speed, budget, share, settings.cuda_device_id)
