"""The coordinator's settings (also `appliance serve`'s): placement, routing, hops, generation,
the result cache and jobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from appliance.config.server import ServerConfig
from appliance.errors import ConfigError


@dataclass(frozen=True)
class CoordinatorConfig(ServerConfig):
    port: int = field(default=8000, metadata={"help": "port to bind; 0 picks a free one"})
    model_repo: str = field(default="", metadata={"help": "model repository (packages to place)"})
    state_dir: str = field(
        default="",
        metadata={"help": "where placements are kept (default: model_repo/.coordinator)"},
    )
    models: list[str] = field(
        default_factory=list, metadata={"help": "models to place once enough nodes have joined"}
    )
    stages: int = field(default=0, metadata={"help": "spans per model (0: fewest that fit)"})
    replicas: int = field(default=1, metadata={"help": "replicas of every span"})
    node_timeout_s: float = field(
        default=3.0, metadata={"help": "a node silent this long is out of routes"}
    )
    request_timeout_s: float = field(
        default=30.0, metadata={"help": "deadline of a request without a timeout parameter"}
    )
    replace_after_s: float = field(
        default=60.0,
        metadata={"help": "a node gone this long has its spans placed elsewhere (0: never)"},
    )
    load_timeout_s: float = field(
        default=300.0, metadata={"help": "how long a repository load may take before 503"}
    )
    hop_batching: bool = field(
        default=True,
        metadata={
            "help": "requests queued behind busy hops leave together as one hop (a lone "
            "request never waits)"
        },
    )
    max_hop_batch_rows: int = field(
        default=32, metadata={"help": "rows per batched hop; keep <= the nodes' max_batch_size"}
    )
    max_hop_queue: int = field(
        default=1024,
        metadata={"help": "requests waiting for a hop per model before 503 + Retry-After"},
    )
    hops_in_flight_per_replica: int = field(
        default=2,
        metadata={"help": "hops outstanding per first-span replica before requests queue up"},
    )
    cache_enabled: bool = field(default=True, metadata={"help": "the LMDB result cache"})
    cache_dir: str = field(default="", metadata={"help": "cache folder (default state_dir/cache)"})
    cache_max_bytes: int = field(
        default=512 * 1024 * 1024, metadata={"help": "stored results kept under this many bytes"}
    )
    cache_map_bytes: int = field(
        default=0,
        metadata={
            "help": "LMDB map size of the cache (0: twice cache_max_bytes, at least 64 MiB); "
            "the map is address space, reserved on disk only as written"
        },
    )
    cache_admit_after: int = field(
        default=2, metadata={"help": "store a result once its input was seen this often (K)"}
    )
    cache_ttl_s: float = field(default=0.0, metadata={"help": "entry lifetime (0: until evicted)"})
    cache_models: list[str] = field(
        default_factory=list,
        metadata={"help": "per model: NAME=off or NAME=TTL_SECONDS (e.g. demo=60)"},
    )
    jobs_dir: str = field(
        default="", metadata={"help": "job store folder (default state_dir/jobs)"}
    )
    job_workers: int = field(default=4, metadata={"help": "async jobs run at once"})
    job_ttl_s: float = field(default=3600.0, metadata={"help": "finished jobs are kept this long"})
    max_tokens_limit: int = field(
        default=2048,
        metadata={"help": "generation: the most new tokens one request may ask (max_tokens)"},
    )
    generation_timeout_s: float = field(
        default=600.0, metadata={"help": "generation: the longest one request may run"}
    )
    max_streams_per_client: int = field(
        default=64,
        metadata={
            "help": "generation: streams one client may hold open, 429 past it (0: no limit; a "
            "client is its token, else its address)"
        },
    )
    stream_write_timeout_s: float = field(
        default=10.0,
        metadata={
            "help": "generation: a stream whose client takes no chunk for this long is ended "
            "and its sequence freed"
        },
    )
    stream_buffer_bytes: int = field(
        default=65536,
        metadata={
            "help": "generation: a stream's send buffer (kernel and transport) before its "
            "writes wait for the client"
        },
    )
    group_steps: bool = field(
        default=True,
        metadata={
            "help": "generation: the one-token steps of sequences on the same chain that are "
            "ready in one turn go to the nodes as one call (nodes of protocol 4); off: one "
            "call per sequence and step"
        },
    )
    step_timeout_s: float = field(
        default=5.0,
        metadata={
            "help": "generation: a step not answered in this long has its chain's nodes "
            "probed (a prefill waits one more per 64 tokens); one that does not answer counts "
            "the chain as lost and the sequence is replayed elsewhere, else the step waits on"
        },
    )
    max_replays: int = field(
        default=3,
        metadata={"help": "generation: times one sequence's chain may be rebuilt"},
    )
    drain_timeout_s: float = field(
        default=60.0,
        metadata={
            "help": "version switch: how long requests and sequences on the old version may "
            "finish before its spans are unloaded anyway"
        },
    )
    rebalance: Literal["manual", "replicas"] = field(
        default="manual",
        metadata={
            "help": "replicas: a node that joins with free memory gets an extra replica of "
            "the busiest span (manual: new nodes wait for a load or a lost node)"
        },
    )

    def cache_map_size(self) -> int:
        return self.cache_map_bytes or max(2 * self.cache_max_bytes, 64 << 20)

    def check(self) -> None:
        self.check_server()
        if self.cache_map_bytes and self.cache_map_bytes < self.cache_max_bytes:
            raise ConfigError(
                f"cache_map_bytes {self.cache_map_bytes} is below cache_max_bytes "
                f"{self.cache_max_bytes}: the map would fill first; give about twice as much"
            )
        if self.replicas < 1:
            raise ConfigError(f"replicas must be at least 1, got {self.replicas}")
        if self.stages < 0:
            raise ConfigError(f"stages must be 0 (automatic) or more, got {self.stages}")
        if self.max_streams_per_client < 0:
            raise ConfigError(
                f"max_streams_per_client must be 0 (no limit) or more, got "
                f"{self.max_streams_per_client}"
            )
        if not self.stream_write_timeout_s > 0:
            raise ConfigError(
                f"stream_write_timeout_s must be above 0, got {self.stream_write_timeout_s}"
            )
        if self.stream_buffer_bytes < 4096:
            raise ConfigError(
                f"stream_buffer_bytes must be at least 4096, got {self.stream_buffer_bytes}"
            )
        if not self.step_timeout_s > 0:
            raise ConfigError(f"step_timeout_s must be above 0, got {self.step_timeout_s}")
        if self.max_replays < 0:
            raise ConfigError(f"max_replays must be 0 or more, got {self.max_replays}")
        if not self.drain_timeout_s > 0:
            raise ConfigError(f"drain_timeout_s must be above 0, got {self.drain_timeout_s}")
        if not self.generation_timeout_s > 0:
            raise ConfigError(
                f"generation_timeout_s must be above 0, got {self.generation_timeout_s}"
            )
        for name in (
            "max_hop_batch_rows",
            "hops_in_flight_per_replica",
            "max_hop_queue",
            "max_tokens_limit",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
