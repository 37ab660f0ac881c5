"""Prometheus metrics of one process, in a registry of its own (tests run several apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import psutil
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from appliance.http.request_metrics import LATENCY_BUCKETS, RequestMetrics
from appliance.node.gpu_memory import GpuMemory, gpu_memory
from appliance.ring.links import LinkCollector, LinkTable
from runtime.decoder_registry import DecoderRegistry
from runtime.registry import LoadedModel

DECODE_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


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


class _DecoderCollector(Collector):
    """Generation spans: batching, sequences live and queued, prompt vs generated tokens,
    prefix reuse; read from the slots' counters at scrape time."""

    def __init__(self, decoders: DecoderRegistry) -> None:
        self._decoders = decoders

    def collect(self) -> Iterable[Metric]:
        labels = ["model", "span"]
        batches = HistogramMetricFamily(
            "appliance_decode_batch_rows", "sequences per decode batch run", labels=labels
        )
        gauges = {
            key: GaugeMetricFamily(f"appliance_{key}", text, labels=labels)
            for key, text in (
                ("sequences_live", "generation sequences open on the span"),
                ("sequences_queued", "opens waiting for a place or KV on the span"),
            )
        }
        counters = {
            key: CounterMetricFamily(f"appliance_{name}", text, labels=labels)
            for key, name, text in (
                ("prefill_tokens", "prefill_tokens", "prompt tokens computed (prefill)"),
                ("generated_tokens", "generated_tokens", "generated tokens computed (decode)"),
                ("prefix_hits", "prefix_hits", "opens that started from a cached prefix"),
                ("prefix_misses", "prefix_misses", "opens with prefix_ids and no cached prefix"),
                ("prefix_cached_tokens", "prefix_cached_tokens", "prompt tokens served cached"),
                ("ahead_runs", "decode_ahead_steps", "decode steps run before they were asked"),
                (
                    "alone_runs",
                    "alone_session_runs",
                    "runs holding every open sequence, on the sessions with more threads",
                ),
                (
                    "ahead_discarded",
                    "decode_ahead_discarded",
                    "steps run ahead and not used (the sequence stopped, or another step came)",
                ),
            )
        }
        for slot in self._decoders.slots.values():
            info = slot.info()
            key = [slot.name, f"{slot.first}-{slot.last}"]
            sizes: dict[int, int] = info["decode_batches"]
            buckets, running = [], 0
            for bound in DECODE_BATCH_BUCKETS:
                running = sum(n for rows, n in sizes.items() if rows <= bound)
                buckets.append((str(bound), running))
            buckets.append(("+Inf", sum(sizes.values())))
            total = sum(rows * n for rows, n in sizes.items())
            batches.add_metric(key, buckets, total)
            for name, gauge in gauges.items():
                gauge.add_metric(key, info[name])
            for name, counter in counters.items():
                counter.add_metric(key, info[name])
        yield batches
        yield from gauges.values()
        yield from counters.values()


class Metrics:
    def __init__(
        self,
        models: Callable[[], list[LoadedModel]],
        decoders: DecoderRegistry | None = None,
        links: Callable[[], LinkTable | None] = lambda: None,
    ) -> None:
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
        # a hop's or step's own span run on this node: with the links' network seconds,
        # the split of a ring's time between compute and the network
        self.hop_compute = Histogram(
            "appliance_hop_compute_seconds",
            "time this node's span took on a hop (kind hop) or generation step (kind step)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.hop_compute_totals: dict[str, list[float]] = {"hop": [0.0, 0], "step": [0.0, 0]}
        self.registry.register(LinkCollector(links))
        self.registry.register(_ModelCollector(models))
        if decoders is not None:
            self.registry.register(_DecoderCollector(decoders))

    def observe_hop_compute(self, kind: str, seconds: float) -> None:
        """A hop's (``hop``) or generation step's (``step``) own span run on this node."""
        self.hop_compute.labels(kind).observe(seconds)
        total = self.hop_compute_totals[kind]
        total[0] += seconds
        total[1] += 1

    def observe_batch(self, model: str, queued_s: float, compute_s: float) -> None:
        self.queue_latency.labels(model).observe(queued_s)
        self.compute_latency.labels(model).observe(compute_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
