"""Per-model counters in the shape of Triton's statistics extension (GET .../stats)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStats:
    """Counts rows (inference_count) and session runs (execution_count) like Triton does."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)  # answered from a result cache
    cache_miss: Duration = field(default_factory=Duration)  # looked up, not found
    batch_sizes: dict[int, Duration] = field(default_factory=dict)
    ewma_latency_s: float = 0.0  # per request, queue included (what a caller would see)

    def record_latency(self, seconds: float, alpha: float = 0.2) -> None:
        if self.success.count <= 1:
            self.ewma_latency_s = seconds
        else:
            self.ewma_latency_s = alpha * seconds + (1 - alpha) * self.ewma_latency_s

    def record_batch(self, rows: int, compute_ns: int) -> None:
        self.inference_count += rows
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        self.batch_sizes.setdefault(rows, Duration()).add(compute_ns)

    def record_execution(self, rows: int, compute_ns: int) -> None:
        """One run for ``rows`` rows whose requests are counted apart (a coordinator's hop)."""
        self.execution_count += 1
        self.batch_sizes.setdefault(rows, Duration()).add(compute_ns)

    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "cache_hit": self.cache_hit.as_dict(),
                "cache_miss": self.cache_miss.as_dict(),
            },
            "batch_stats": [
                {"batch_size": size, "compute_infer": d.as_dict()}
                for size, d in sorted(self.batch_sizes.items())
            ],
        }
