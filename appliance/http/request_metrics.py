"""The request metrics every server exports (one definition: nodes and the coordinator count
inference requests the same way)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram

from appliance.http.errors import status_of

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)

T = TypeVar("T")


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry, where: str) -> None:
        self.requests = Counter(
            "appliance_requests",
            "inference requests by model and status",
            ["model", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "appliance_request_seconds",
            f"inference latency, end to end within this {where}",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    async def observe(self, model: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` and count it under its status (200, or the error's mapped status)."""
        started = time.perf_counter()
        status = 200
        try:
            return await call()
        except Exception as exc:
            status = status_of(exc) or 500
            raise
        finally:
            self.requests.labels(model, str(status)).inc()
            if status == 200:
                self.latency.labels(model).observe(time.perf_counter() - started)
