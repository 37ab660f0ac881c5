"""Prometheus metrics of one process, in a registry of its own (tests run several apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import psutil
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.http.request_metrics import LATENCY_BUCKETS, RequestMetrics
from appliance.node.gpu_memory import GpuMemory, gpu_memory
from runtime.registry import LoadedModel


class _ModelCollector(Collector):
    """Read at scrape time from the runtime's counters: nothing extra on the hot path."""

    def __init__(self, models: Callable[[], list[LoadedModel]]) -> None:
        self._models = models
        self._process = psutil.Process()

    def collect(self) -> Iterable[Metric]:
        rows = CounterMetricFamily(
            "appliance_model_inferences",
            "rows inferred (batch rows count one each)",
            labels=["model", "version"],
        )
        runs = CounterMetricFamily(
            "appliance_model_executions",
            "session runs (one per batch)",
            labels=["model", "version"],
        )
        queue = GaugeMetricFamily("appliance_queue_depth", "requests waiting", labels=["model"])
        # by digest too: during a switch a node holds two versions of a span side by side
        in_flight = GaugeMetricFamily(
            "appliance_in_flight",
            "requests queued or running",
            labels=["model", "version", "digest", "span"],
        )
        queue_s = CounterMetricFamily(
            "appliance_queue_seconds", "time requests spent queued", labels=["model"]
        )
        compute_s = CounterMetricFamily(
            "appliance_compute_seconds", "time requests spent in a run", labels=["model"]
        )
        for model in self._models():
            stats = model.stats
            rows.add_metric([model.name, model.version], stats.inference_count)
            runs.add_metric([model.name, model.version], stats.execution_count)
            queue.add_metric([model.name], model.batcher.queue_depth)
            span = f"{model.span[0]}-{model.span[1]}"
            in_flight.add_metric(
                [model.name, model.version, model.digest, span], model.batcher.outstanding
            )
            queue_s.add_metric([model.name], stats.queue.ns / 1e9)
            compute_s.add_metric([model.name], stats.compute_infer.ns / 1e9)
        batches = CounterMetricFamily(
            "appliance_batch_runs", "session runs by rows in the batch", labels=["model", "rows"]
        )
        for model in self._models():
            for size, duration in model.stats.batch_sizes.items():
                batches.add_metric([model.name, str(size)], duration.count)
        yield from (rows, runs, queue, in_flight, queue_s, compute_s, batches)
        cpu = CounterMetricFamily("appliance_process_cpu_seconds", "CPU time of this process")
        times = self._process.cpu_times()
        cpu.add_metric([], times.user + times.system)
        yield cpu
        memory = GaugeMetricFamily("appliance_process_resident_bytes", "resident memory (RSS)")
        memory.add_metric([], self._process.memory_info().rss)
        yield memory
        yield from gpu_memory_metrics(gpu_memory())


def gpu_memory_metrics(gpus: list[GpuMemory]) -> Iterable[Metric]:
    """appliance_gpu_memory_bytes{gpu, name, what=used|total|process}; nothing without a GPU."""
    if not gpus:
        return
    family = GaugeMetricFamily(
        "appliance_gpu_memory_bytes",
        "GPU memory: used and total on the device, and held by this process",
        labels=["gpu", "name", "what"],
    )
    for gpu in gpus:
        family.add_metric([str(gpu.index), gpu.name, "used"], gpu.used_bytes)
        family.add_metric([str(gpu.index), gpu.name, "total"], gpu.total_bytes)
        if gpu.process_bytes is not None:
            family.add_metric([str(gpu.index), gpu.name, "process"], gpu.process_bytes)
    yield family


class Metrics:
    def __init__(self, models: Callable[[], list[LoadedModel]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry, "node")
        self.batch_rows = Histogram(
            "appliance_request_rows",
            "rows per inference request",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.queue_latency = Histogram(
            "appliance_request_queue_seconds",
            "time a request waited for its batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_latency = Histogram(
            "appliance_request_compute_seconds",
            "time of the run that answered a request",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ModelCollector(models))

    def observe_batch(self, model: str, queued_s: float, compute_s: float) -> None:
        self.queue_latency.labels(model).observe(queued_s)
        self.compute_latency.labels(model).observe(compute_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
