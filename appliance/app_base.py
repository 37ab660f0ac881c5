"""The aiohttp application every server starts from: the same middleware stack in the same
order (request id, typed errors, bearer tokens, per-client limit, ring-member certificates)."""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from appliance.auth import auth_middleware, client_limit_middleware, parse_tokens
from appliance.http_errors import error_middleware
from appliance.logs import request_id_middleware
from appliance.tls import require_peer_certificate


class ServerSettings(Protocol):
    """What both NodeConfig and CoordinatorConfig provide (read-only: they are frozen)."""

    @property
    def tokens(self) -> list[str]: ...
    @property
    def tokens_file(self) -> str: ...
    @property
    def metrics_public(self) -> bool: ...
    @property
    def max_concurrent_per_client(self) -> int: ...
    @property
    def tls_ca(self) -> str: ...
    @property
    def tls_cert(self) -> str: ...
    @property
    def max_body_bytes(self) -> int: ...


def new_app(config: ServerSettings) -> web.Application:
    tokens = parse_tokens(config.tokens, config.tokens_file)
    return web.Application(
        middlewares=[
            request_id_middleware,
            error_middleware,
            auth_middleware(tokens, config.metrics_public),
            client_limit_middleware(config.max_concurrent_per_client),
            require_peer_certificate(bool(config.tls_ca and config.tls_cert)),
        ],
        client_max_size=config.max_body_bytes,
    )
