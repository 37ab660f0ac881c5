"""What every appliance process is configured with: one frozen config object per process, built
in ``main`` from TOML then CLI flags (``appliance.config.loading``).

Every field is a TOML key of the same name and a CLI flag ``--the-name`` (as uvicorn mirrors its
Config in its options), so the settings reference can be generated from these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from appliance.errors import ConfigError


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
