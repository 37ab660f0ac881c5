"""How a process calls the other ring members: one aiohttp session (joins, heartbeats, loads,
file fetches) and one hop client, both with the cluster's TLS, token and signatures."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from appliance.config import ServerConfig
from appliance.ring.hop_transport import HopPost, close_hop_post, hop_post
from appliance.security.auth import internal_headers
from appliance.security.signing import signer_for
from appliance.security.tls import client_context


@dataclass
class InternalClients:
    session: aiohttp.ClientSession
    hop: HopPost

    async def close(self) -> None:
        await self.session.close()
        await close_hop_post(self.hop)


def internal_clients(config: ServerConfig, sender: str) -> InternalClients:
    """Made inside the running loop (a cleanup context): aiohttp sessions bind to it."""
    tls = client_context(config.tls_ca, config.tls_cert, config.tls_key, config.tls_server_name)
    signer = signer_for(config, sender)
    # an upper bound on this pool's descriptors (joins, heartbeats, loads, file fetches, probes:
    # a few per member), inside the reserve kept out of the inbound connection budget
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=60, ssl=tls),
        headers=internal_headers(config.cluster_token),
        middlewares=(signer.client_middleware(),) if signer else (),
    )
    return InternalClients(session, hop_post(config, session, signer, tls))
