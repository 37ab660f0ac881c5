"""A node's settings: its spans, onnxruntime sessions, batching, KV budget and decode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from appliance.config.server import ServerConfig
from appliance.errors import ConfigError
from runtime.batcher import BatchSettings
from runtime.decoder_admission import DecoderLimits
from runtime.registry import WarmupSettings
from runtime.session import SessionSettings


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
            "may run on (its affinity), shared among runs_in_flight, at least 1; on CUDA: "
            "onnxruntime's default), 0 = onnxruntime's default "
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
    prefill_turn_tokens: int = field(
        default=256,
        metadata={
            "help": "generation: the most prompt tokens (whole chunks, at least one) run between "
            "two decode batches: prompts that arrive together start decoding together, and a "
            "decode batch waits for at most this many prompt tokens"
        },
    )
    decode_gather_us: int = field(
        default=3000,
        metadata={
            "help": "generation: a decode batch of a span holding the whole model waits up "
            "to this, or a quarter of the last run when that is longer, for the rows of the "
            "last two runs still on their way (so streams stay in one batch instead of "
            "alternating halves); 0: no wait. A span holding part of a model waits so only "
            "for the rows of its cohort (decode_cohorts), and with decode_cohorts = 1 not at all"
        },
    )
    decode_ahead: bool = field(
        default=True,
        metadata={
            "help": "generation: a node holding a model whole runs each sequence's next decode "
            "step as soon as it has drawn the token, before the coordinator sends it back (one "
            "step ahead at most; thrown away when the sequence stops)"
        },
    )
    decode_cohorts: int = field(
        default=2,
        metadata={
            "help": "generation: a span holding part of a model runs its decode steps in this "
            "many batches (cohorts), which follow one another along the chain so that its "
            "spans compute at once: all of its sequences' steps waiting at once split so; a "
            "cohort stays together (a late row of it is waited for, as decode_gather_us says); "
            "while more cohorts have formed, a fragment of at most half a cohort's rows waits "
            "up to one run for others to join it. 1: every step waiting runs in one batch, "
            "and nothing is waited for"
        },
    )
    decode_io_binding: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "generation: decode steps run through onnxruntime IO binding, so that a "
            "decode batch's KV stays in the session's memory between steps (on CUDA: GPU "
            "memory; copied to the host only when the batch's rows change). auto = where the "
            "sessions got CUDA, on = also on CPU, off = never"
        },
    )
    alone_intra_op_threads: int = field(
        default=0,
        metadata={
            "help": "generation, CPU: a span holding part of a model also loads its sessions "
            "with this many threads, and runs on them the steps that hold every open sequence "
            "of the span (a chain serving one stream computes one span at a time, so nodes "
            "that share a machine's cores leave them idle); costs a second copy of the span's "
            "weights, taken from the KV budget. 0: none (appliance serve sets the usable cores "
            "when it shares them out among its nodes)"
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
            prefill_turn_tokens=self.prefill_turn_tokens,
            prefix_block_tokens=self.prefix_block_tokens,
            decode_ahead=self.decode_ahead,
            decode_cohorts=self.decode_cohorts,
        )

    def session_settings(self) -> SessionSettings:
        return SessionSettings(
            device=self.device,
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            graph_optimization=self.graph_optimization,
            allow_spinning=self.allow_spinning,
            concurrent_runs=self.runs_in_flight,
            decode_io_binding=self.decode_io_binding,
            alone_intra_op_threads=self.alone_intra_op_threads,
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
        for name in ("inter_op_threads", "max_queue_delay_us", "alone_intra_op_threads"):
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
