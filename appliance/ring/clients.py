"""How a process calls the other ring members: one aiohttp session (joins, heartbeats, loads,
file fetches) and one hop client, both with the cluster's TLS, token and signatures."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp

from appliance.config import ServerConfig
from appliance.ring.hop_transport import HopPost, close_hop_post, hop_post
from appliance.ring.links import LinkTable, Prober, measured, probe
from appliance.ring.local_peers import LocalPeers
from appliance.security.auth import internal_headers
from appliance.security.signing import signer_for
from appliance.security.tls import client_context


@dataclass
class InternalClients:
    session: aiohttp.ClientSession
    raw_hop: HopPost  # not timed: probes time themselves
    probe_bytes: int = 256 * 1024
    probe_interval_s: float = 300.0
    links: LinkTable = field(default_factory=LinkTable)
    local: LocalPeers | None = None  # members in this process: called, not sent to
    hop: HopPost = field(init=False)  # every call to a member, its link share filed in links
    prober: Prober = field(init=False)

    def __post_init__(self) -> None:
        post = self.local.wrap(self.raw_hop) if self.local is not None else self.raw_hop
        self.hop = measured(post, self.links)
        self.prober = Prober(self.probe, self.probe_interval_s)

    async def probe(self, peer: str) -> None:
        await probe(self.raw_hop, peer, self.links, self.probe_bytes)

    async def close(self) -> None:
        await self.prober.close()
        await self.session.close()
        await close_hop_post(self.raw_hop)


def internal_clients(
    config: ServerConfig, sender: str, local: LocalPeers | None = None
) -> InternalClients:
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
    return InternalClients(
        session,
        hop_post(config, session, signer, tls),
        min(config.link_probe_bytes, config.max_body_bytes),
        config.link_probe_interval_s,
        local=local,
    )
