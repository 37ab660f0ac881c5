"""The aiohttp application every server starts from: the same middleware stack in the same
order (request id, typed errors, ring-member certificates, signatures on internal calls,
bearer tokens, per-client limit)."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from appliance.auth import auth_middleware, client_limit_middleware, internal_headers, parse_tokens
from appliance.config import ServerConfig
from appliance.hop_transport import HopPost, close_hop_post, hop_post
from appliance.http_errors import error_middleware
from appliance.logs import request_id_middleware
from appliance.signing import Signer, Verifier, parse_secrets, signature_middleware
from appliance.tls import client_context, require_peer_certificate


@dataclass
class InternalClients:
    """How a process calls the other ring members: an aiohttp session (joins, heartbeats,
    loads, file fetches) and the hop client, both with the cluster's TLS, token and
    signatures."""

    session: aiohttp.ClientSession
    hop: HopPost

    async def close(self) -> None:
        await self.session.close()
        await close_hop_post(self.hop)


def internal_clients(config: ServerConfig, sender: str) -> InternalClients:
    """Made inside the running loop (on_startup): aiohttp sessions bind to it."""
    tls = client_context(config.tls_ca, config.tls_cert, config.tls_key)
    signer = signer_for(config, sender)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ssl=tls),
        headers=internal_headers(config.cluster_token),
        middlewares=(signer.client_middleware(),) if signer else (),
    )
    return InternalClients(session, hop_post(config, session, signer, tls))


def verifier_for(config: ServerConfig) -> Verifier | None:
    secrets = parse_secrets(config.cluster_secrets, config.cluster_secrets_file)
    return Verifier(secrets, config.signature_window_s) if secrets else None


def signer_for(config: ServerConfig, sender: str) -> Signer | None:
    secrets = parse_secrets(config.cluster_secrets, config.cluster_secrets_file)
    return Signer(secrets[0], sender) if secrets else None


def new_app(config: ServerConfig) -> web.Application:
    tokens = parse_tokens(config.tokens, config.tokens_file)
    verifier = verifier_for(config)
    return web.Application(
        middlewares=[
            request_id_middleware,
            error_middleware,
            # the outer layer first: internal paths only from holders of a cluster certificate
            require_peer_certificate(bool(config.tls_ca and config.tls_cert)),
            # signed internal calls need no bearer token: the signature is the stronger proof
            signature_middleware(verifier),
            auth_middleware(tokens, config.metrics_public, signed_internal=verifier is not None),
            client_limit_middleware(config.max_concurrent_per_client),
        ],
        client_max_size=config.max_body_bytes,
    )
