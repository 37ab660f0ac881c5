"""The coordinator's Prometheus metrics, in a registry of its own (tests run several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from appliance.http.request_metrics import LATENCY_BUCKETS, RequestMetrics


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = RequestMetrics(r, "coordinator")
        self.hop_attempts = Counter(
            "appliance_hop_attempts", "calls to a first-span node", ["node"], registry=r
        )
        self.retries = Counter(
            "appliance_hop_retries", "hops retried on another replica", ["node"], registry=r
        )
        self.hedges = Counter(
            "appliance_hop_hedges",
            "hops also sent to this replica because the first was past its replica's p99",
            ["node"],
            registry=r,
        )
        self.ejections = Counter(
            "appliance_ejections", "replicas ejected after a failure", ["node"], registry=r
        )
        self.members = Gauge(
            "appliance_ring_members", "ring members by health", ["health"], registry=r
        )
        self.cache = Counter(
            "appliance_cache_requests",
            "requests by cache outcome (hit, miss, bypass)",
            ["model", "outcome"],
            registry=r,
        )
        self.jobs = Gauge("appliance_jobs", "async jobs by status", ["status"], registry=r)
        self.cache_state = Gauge(
            "appliance_cache",
            "result cache: entries, bytes, hits, misses, evictions, degraded",
            ["what"],
            registry=r,
        )
        self.hop_rows = Histogram(
            "appliance_hop_rows",
            "rows per hop into the ring (more than one: requests batched together)",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.tokens = Counter(
            "appliance_generation_tokens",
            "tokens of generation requests, by kind (prompt, completion)",
            ["model", "kind"],
            registry=r,
        )
        self.ttft = Histogram(
            "appliance_generation_ttft_seconds",
            "time to the first token (open, prefill, the first sampled token)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "appliance_generation_inter_token_seconds",
            "time between two tokens of one sequence",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sequences = Gauge(
            "appliance_generation_sequences", "sequences being generated", ["model"], registry=r
        )
        self.kv_bytes = Gauge(
            "appliance_kv_bytes",
            "KV cache of generation on each node (capacity, reserved, used), from heartbeats",
            ["node", "what"],
            registry=r,
        )
        self.replays = Counter(
            "appliance_generation_replays",
            "sequences whose chain was rebuilt on other replicas after a node was lost",
            ["model"],
            registry=r,
        )
        self.replay_seconds = Histogram(
            "appliance_generation_replay_seconds",
            "from a lost step to the token of the rebuilt chain (probe, open, replay)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_rows = Histogram(
            "appliance_generation_step_rows",
            "decode steps per call to a chain's first node (more than one: steps grouped)",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.stalled_streams = Counter(
            "appliance_generation_stalled_streams",
            "streams ended because their client read nothing for stream_write_timeout_s",
            registry=r,
        )
        self.generation_cache = Counter(
            "appliance_generation_cache",
            "greedy generation requests answered from the result cache (hit) or not",
            ["model", "outcome"],
            registry=r,
        )
        self.in_process_calls = Counter(
            "appliance_in_process_calls",
            "ring calls to a node in this process, answered as function calls (no HTTP hop)",
            ["node"],
            registry=r,
        )
        self.switches = Counter(
            "appliance_version_switches",
            "times a model's route flipped to a new version or placement",
            ["model"],
            registry=r,
        )
        self.hop_latency = Histogram(
            "appliance_hop_seconds",
            "first hop to its answer (the rest of the chain included)",
            ["node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
