"""One frozen config object per process, built in ``main`` from TOML then CLI flags.

Every field is a TOML key of the same name and a CLI flag ``--the-name`` (as uvicorn mirrors its
Config in its options), so the settings reference can be generated from this class.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from appliance.errors import ConfigError
from runtime.batcher import BatchSettings
from runtime.decoder_admission import DecoderLimits
from runtime.registry import WarmupSettings
from runtime.session import SessionSettings


@dataclass(frozen=True)
class ServerConfig:
    """What every appliance process has: where it listens, its limits, logs, tokens, TLS
    and cluster secrets. Subclasses redefine a field to change its default or help; it keeps
    its place (dataclass order), so the settings reference lists the shared keys first."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=0, metadata={"help": "port to bind; 0 picks a free one"})
    model_repo: str = field(default="", metadata={"help": "model repository folder"})
    models: list[str] = field(default_factory=list, metadata={"help": "models to serve"})
    state_dir: str = field(default="", metadata={"help": "where this process keeps its state"})
    max_body_bytes: int = field(
        default=64 * 1024 * 1024, metadata={"help": "request body limit, also after decompression"}
    )
    max_tensor_elements: int = field(
        default=16 * 1024 * 1024,
        metadata={"help": "elements of one input tensor before 413 (0: no limit)"},
    )
    compress_responses: Literal["auto", "always", "never"] = field(
        default="auto",
        metadata={
            "help": "gzip/deflate answers for clients that accept it: auto = JSON answers of "
            "4 KiB or more to clients on other hosts (binary tensors barely compress; on "
            "loopback compressing only costs CPU)"
        },
    )
    max_concurrent_per_client: int = field(
        default=0, metadata={"help": "requests in flight per client before 429 (0: no limit)"}
    )
    min_attempt_s: float = field(
        default=1.0, metadata={"help": "shortest time a hop attempt gets before failing over"}
    )

    lean_hops: bool = field(
        default=True,
        metadata={"help": "hops over a lean keep-alive HTTP/1.1 client (false: aiohttp's)"},
    )
    link_probe_bytes: int = field(
        default=256 * 1024,
        metadata={
            "help": "a link to a member is probed when the member is first seen: a few "
            "empty calls (latency) and one of this many bytes, at most max_body_bytes "
            "(throughput); 0: latency only"
        },
    )
    link_probe_interval_s: float = field(
        default=300.0,
        metadata={"help": "a link is probed again this long after (traffic measures it between)"},
    )
    log_level: Literal["debug", "info", "warning", "error"] = field(
        default="info", metadata={"help": "logging level"}
    )
    log_format: Literal["text", "json"] = field(default="text", metadata={"help": "log format"})
    access_log: bool = field(default=True, metadata={"help": "one log line per request"})
    tokens: list[str] = field(
        default_factory=list,
        metadata={"help": "bearer tokens as ROLE:TOKEN (roles infer, admin); none = auth off"},
    )
    tokens_file: str = field(default="", metadata={"help": "file of ROLE:TOKEN lines"})
    metrics_public: bool = field(default=False, metadata={"help": "/metrics without a token"})
    cluster_token: str = field(
        default="", metadata={"help": "admin token this process presents on internal calls"}
    )
    cluster_secrets: list[str] = field(
        default_factory=list,
        metadata={
            "help": "HMAC secrets signing internal calls: the first signs, both are accepted "
            "(two while rotating); none = internal calls unsigned"
        },
    )
    cluster_secrets_file: str = field(
        default="", metadata={"help": "file of cluster secrets, one per line (first signs)"}
    )
    signature_window_s: float = field(
        default=30.0,
        metadata={"help": "signed internal calls are accepted this close to the local clock"},
    )
    tls_cert: str = field(default="", metadata={"help": "PEM certificate: serve HTTPS"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of tls_cert"})
    tls_ca: str = field(
        default="",
        metadata={"help": "cluster CA: verify peers, and require their certificates (mTLS)"},
    )
    tls_server_name: str = field(
        default="",
        metadata={
            "help": "the name to verify in ring members' certificates instead of the host of "
            "their URL (members sharing one certificate issued for that name)"
        },
    )
    # --- ring membership ---

    # --- connections: timeouts, the descriptor budget, shedding, log limits (issue 18) ---
    header_timeout_s: float = field(
        default=10.0,
        metadata={
            "help": "a connection must send a request's headers this soon after it opens (or "
            "after its first byte, on a kept-alive connection)"
        },
    )
    idle_timeout_s: float = field(
        default=30.0, metadata={"help": "an idle kept-alive public connection is closed after"}
    )
    member_idle_timeout_s: float = field(
        default=90.0,
        metadata={
            "help": "the same for ring members' connections: above the hop and session pools' "
            "60 s keep-alive, so pooled hops are not cut"
        },
    )
    body_min_bytes_per_s: int = field(
        default=1024,
        metadata={
            "help": "body floor: once headers are in, every body_grace_s must bring this "
            "many bytes per second, else 408 (0: no floor)"
        },
    )
    body_grace_s: float = field(
        default=5.0, metadata={"help": "the window over which the body floor is measured"}
    )
    body_timeout_s: float = field(
        default=120.0,
        metadata={
            "help": "a request body must be complete this soon after its headers, "
            "else 408 (0: no limit)"
        },
    )
    write_timeout_s: float = field(
        default=30.0,
        metadata={
            "help": "an answer that makes no progress this long (a client that does not "
            "read) ends its connection"
        },
    )
    member_stall_timeout_s: float = field(
        default=30.0,
        metadata={
            "help": "ring members' bodies and answers may stall this long (the default "
            "request deadline) instead of the floor and write_timeout_s"
        },
    )
    tls_handshake_timeout_s: float = field(
        default=10.0, metadata={"help": "a TLS handshake must finish this soon"}
    )
    max_connections: int = field(
        default=0,
        metadata={
            "help": "inbound connections at most (0: the descriptor limit, raised to its "
            "hard limit at start, minus connection_reserve)"
        },
    )
    connection_reserve: int = field(
        default=0,
        metadata={
            "help": "descriptors kept for what the process opens itself: hops, sessions, "
            "LMDB, files (0: an eighth of the limit, 64 to 1024)"
        },
    )
    max_connections_per_peer: int = field(
        default=0,
        metadata={
            "help": "inbound connections per client address (0: no limit; ring members are exempt)"
        },
    )
    peer_limit_loopback: bool = field(
        default=False,
        metadata={"help": "apply max_connections_per_peer to loopback clients too"},
    )
    listen_backlog: int = field(
        default=4096,
        metadata={"help": "connections the kernel queues before accept (capped by somaxconn)"},
    )
    overload_lag_ms: float = field(
        default=25.0,
        metadata={
            "help": "inference requests get 503 + Retry-After while the event loop "
            "lags this much behind (0: no admission control)"
        },
    )
    log_repeat_interval_s: float = field(
        default=10.0,
        metadata={
            "help": "a repeated log line (same logger, message and error) is written "
            "once per interval, with the count of those suppressed (0: all)"
        },
    )

    def check_server(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be at least 1, got {self.max_body_bytes}")
        for name in ("max_tensor_elements", "max_concurrent_per_client"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (no limit) or more, got {getattr(self, name)}")
        if self.signature_window_s <= 0:
            raise ConfigError(f"signature_window_s must be above 0, got {self.signature_window_s}")
        if self.link_probe_bytes < 0:
            raise ConfigError(f"link_probe_bytes must be 0 or more, got {self.link_probe_bytes}")
        if self.link_probe_interval_s <= 0:
            raise ConfigError(
                f"link_probe_interval_s must be above 0, got {self.link_probe_interval_s}"
            )
        self.check_connections()

    def check_connections(self) -> None:
        positive = (
            "header_timeout_s",
            "idle_timeout_s",
            "member_idle_timeout_s",
            "body_grace_s",
            "write_timeout_s",
            "member_stall_timeout_s",
            "tls_handshake_timeout_s",
            "listen_backlog",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be above 0, got {getattr(self, name)}")
        at_least_zero = (
            "body_min_bytes_per_s",
            "body_timeout_s",
            "max_connections",
            "connection_reserve",
            "max_connections_per_peer",
            "overload_lag_ms",
            "log_repeat_interval_s",
        )
        for name in at_least_zero:
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"{name} must be 0 (off or automatic) or more, got {getattr(self, name)}"
                )
        if self.member_idle_timeout_s <= 60:  # the ring's pools keep idle connections 60 s
            raise ConfigError(
                f"member_idle_timeout_s must stay above 60 s, the keep-alive of the ring's "
                f"connection pools, or pooled hops are cut; got {self.member_idle_timeout_s}"
            )


@dataclass(frozen=True)
class NodeConfig(ServerConfig):
    port: int = field(default=9100, metadata={"help": "port to bind; 0 picks a free one"})
    models: list[str] = field(
        default_factory=list, metadata={"help": "models to load at start (empty: all)"}
    )
    device: Literal["auto", "cuda", "cpu"] = field(
        default="auto", metadata={"help": "auto = CUDA if a session really gets it, else CPU"}
    )
    intra_op_threads: int = field(
        default=-1,
        metadata={
            "help": "onnxruntime threads per run: -1 = auto (on CPU: the cores this process "
            "may run on (its affinity) - 1, shared among runs_in_flight, at least 1: one core "
            "is left to HTTP work; on CUDA: onnxruntime's default), 0 = onnxruntime's default "
            "(one per physical core), N = N"
        },
    )
    inter_op_threads: int = field(default=1, metadata={"help": "threads across graph nodes"})
    graph_optimization: Literal["disable", "basic", "extended", "all"] = field(
        default="all", metadata={"help": "onnxruntime graph optimisation level"}
    )
    allow_spinning: bool = field(
        default=False, metadata={"help": "let onnxruntime threads spin between runs"}
    )
    max_batch_size: int = field(default=32, metadata={"help": "rows per run; 1 = no batching"})
    max_queue_delay_us: int = field(
        default=2000, metadata={"help": "longest wait of the oldest request for a fuller batch"}
    )
    max_queue_size: int = field(
        default=512, metadata={"help": "queued requests per model before 503"}
    )
    runs_in_flight: int = field(
        default=1,
        metadata={
            "help": "batches of one model that may run at once: the next batch forms and "
            "starts while earlier ones run (each on intra_op_threads threads)"
        },
    )
    warmup: bool = field(default=True, metadata={"help": "run each model before it is ready"})
    warmup_dynamic_dim: int = field(
        default=16, metadata={"help": "size given to variable non-batch dims at warm-up"}
    )
    drain_timeout_s: float = field(
        default=30.0, metadata={"help": "how long queued requests may finish at unload or stop"}
    )
    join: str = field(default="", metadata={"help": "coordinator to join, host:port or URL"})
    node_id: str = field(
        default="", metadata={"help": "stable node id (default: made once, kept in state_dir)"}
    )
    state_dir: str = field(
        default="", metadata={"help": "where the node keeps its id (default: model_repo/.node)"}
    )
    advertise_url: str = field(
        default="", metadata={"help": "URL peers use to reach this node (default: bound address)"}
    )
    memory_budget: int = field(
        default=0,
        metadata={
            "help": "bytes for spans (0: the RAM available at start, or the GPU's memory on "
            "a CUDA node, divided by memory_share)"
        },
    )
    memory_share: int = field(
        default=1,
        metadata={
            "help": "nodes sharing this host's memory: each counts 1/N of it (appliance "
            "serve sets it to its node count)"
        },
    )
    heartbeat_interval_s: float = field(
        default=1.0, metadata={"help": "seconds between heartbeats to the coordinator"}
    )
    kv_budget_bytes: int = field(
        default=0,
        metadata={
            "help": "bytes of KV cache for generation (0: what memory_budget leaves after the "
            "spans held, each counted as 1.15 x its bytes + 150 MB)"
        },
    )
    kv_idle_ttl_s: float = field(
        default=60.0,
        metadata={"help": "a sequence with no step for this long is freed (its client is gone)"},
    )
    max_sequences: int = field(
        default=32,
        metadata={"help": "generation: open sequences per span (the most rows of a decode batch)"},
    )
    max_queued_sequences: int = field(
        default=64,
        metadata={"help": "generation: opens waiting per span for a place or KV; more are 503"},
    )
    sequence_queue_timeout_s: float = field(
        default=30.0,
        metadata={"help": "generation: the longest an open waits in that queue before its 503"},
    )
    prefill_chunk_tokens: int = field(
        default=64,
        metadata={
            "help": "generation: a prompt runs in chunks of this many tokens between decode "
            "batches, so it never stalls the others for its whole length (0: whole)"
        },
    )
    decode_gather_us: int = field(
        default=3000,
        metadata={
            "help": "generation: a decode batch waits up to this for the rows of the last one "
            "still on their way (so streams stay in one batch instead of alternating halves)"
        },
    )
    prefix_block_tokens: int = field(
        default=32,
        metadata={
            "help": "generation: tokens per block of the prefix cache (KV of recent prompts, "
            "inside the KV budget); 0 turns prefix reuse off"
        },
    )

    def decoder_limits(self) -> DecoderLimits:
        return DecoderLimits(
            max_sequences=self.max_sequences,
            max_queued_sequences=self.max_queued_sequences,
            queue_timeout_s=self.sequence_queue_timeout_s,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
            gather_s=self.decode_gather_us / 1e6,
            prefix_block_tokens=self.prefix_block_tokens,
        )

    def session_settings(self) -> SessionSettings:
        return SessionSettings(
            device=self.device,
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            graph_optimization=self.graph_optimization,
            allow_spinning=self.allow_spinning,
            concurrent_runs=self.runs_in_flight,
        )

    def batch_settings(self) -> BatchSettings:
        return BatchSettings(
            self.max_batch_size, self.max_queue_delay_us, self.max_queue_size, self.runs_in_flight
        )

    def warmup_settings(self) -> WarmupSettings:
        return WarmupSettings(self.warmup, self.warmup_dynamic_dim)

    def check(self) -> None:
        self.check_server()
        positive = (
            "max_batch_size",
            "max_queue_size",
            "warmup_dynamic_dim",
            "memory_share",
            "runs_in_flight",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("inter_op_threads", "max_queue_delay_us"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.intra_op_threads < -1:
            raise ConfigError(f"intra_op_threads must be -1 (auto), 0 (onnxruntime's default) "
                              f"or a thread count, got {self.intra_op_threads}")  # fmt: skip
        if self.kv_budget_bytes < 0:
            raise ConfigError(f"kv_budget_bytes must be 0 (automatic) or more, got "
                              f"{self.kv_budget_bytes}")  # fmt: skip
        if not self.kv_idle_ttl_s > 0:
            raise ConfigError(f"kv_idle_ttl_s must be above 0, got {self.kv_idle_ttl_s}")
        try:
            self.decoder_limits().check()
        except ValueError as exc:
            raise ConfigError(str(exc).replace("queue_timeout_s", "sequence_queue_timeout_s")
                              .replace("gather_s", "decode_gather_us")) from None  # fmt: skip


def entries_with_file(entries: list[str], path: str, key: str) -> list[str]:
    """Values given in the config plus those of a file (one per line, # comments), as tokens
    and cluster secrets are: a file can be readable by the service user alone."""
    lines = list(entries)
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {key} {path}: {exc}") from exc
        lines += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return lines


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type[Any], defaults: dict[str, Any]
) -> None:
    """One flag per config field; unset flags stay absent so TOML values are not overridden."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        help_text = f.metadata.get("help", "")
        default = defaults.get(f.name, _default_of(f))
        help_text = f"{help_text} (default: {default!r})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if hint is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif get_origin(hint) is list:
            parser.add_argument(_flag(f.name), nargs="*", metavar="NAME", **kwargs)
        elif get_origin(hint) is Literal:
            parser.add_argument(_flag(f.name), choices=list(get_args(hint)), **kwargs)
        else:
            parser.add_argument(_flag(f.name), type=hint, **kwargs)


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _coerce(cls: type[Any], key: str, value: Any, where: str) -> Any:
    hint = typing.get_type_hints(cls)[key]
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(
                f"{where}: {key} = {value!r} is not accepted; choose one of {list(get_args(hint))}"
            )
        return value
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of strings, got {value!r}")
        return list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type):
        # bool is an int subclass: refuse true/false where a number is expected
        wrong = not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))
        if wrong:
            raise ConfigError(
                f"{where}: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}"
            )
    return value


def load_config(
    cls: type[Any],
    path: Path | None,
    overrides: dict[str, Any],
    defaults: dict[str, Any] | None = None,
) -> Any:
    """defaults < TOML file < CLI flags; unknown keys and wrong types are ConfigErrors."""
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = dict(defaults or {})
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(
                f"{path}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}"
            )
        values.update({k: _coerce(cls, k, v, str(path)) for k, v in raw.items()})
    values.update(
        {k: _coerce(cls, k, v, "command line") for k, v in overrides.items() if k in known}
    )
    config = cls(**values)
    config.check()
    return config


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


def settings_markdown() -> str:
    """docs/settings.md, generated from the config classes (a test keeps the file in step)."""
    lines = [
        "# Settings",
        "",
        "Every setting is a key of the process's TOML file (`--config FILE`) and a flag of the",
        "same name (`max_batch_size` = `--max-batch-size`); flags override the file, which",
        'overrides the defaults. Regenerate: `python -c "from appliance.config import '
        "settings_markdown; print(settings_markdown(), end='')\" > docs/settings.md`.",
        "",
    ]
    for title, cls in (
        ("Node (`appliance node`)", NodeConfig),
        ("Coordinator (`appliance coordinator`, `appliance serve`)", CoordinatorConfig),
    ):
        lines += [
            f"## {title}",
            "",
            "| key | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            kind = kind.replace("|", "\\|")
            lines.append(
                f"| `{f.name}` | {kind} | `{_default_of(f)!r}` | {f.metadata.get('help', '')} |"
            )
        lines.append("")
    return "\n".join(lines)
