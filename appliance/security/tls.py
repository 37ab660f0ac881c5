"""Native HTTPS for coordinator and nodes, and mutual TLS between them when a CA is given."""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from appliance.errors import ConfigError, Forbidden


def server_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext | None:
    """None without a certificate (plain HTTP). With ``client_ca``, a certificate a peer shows
    is verified against it; public clients need none, internal calls must show one
    (``require_peer_certificate``)."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError("TLS needs both tls_cert and tls_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files ({cert}, {key}, {client_ca}): {exc}") from exc
    return context


class _NamedPeers(ssl.SSLContext):
    """A client context that checks every peer's certificate for one fixed name, whatever
    host the URL names: members reached at 127.0.0.1 (or by address) that all show a cluster
    certificate issued for, say, ``ring.internal``. asyncio (so aiohttp and the hop transport
    alike) opens TLS through ``wrap_bio``, where the name to check is passed."""

    server_name = ""

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        if not kwargs.get("server_side") and self.server_name:
            kwargs["server_hostname"] = self.server_name
        return super().wrap_bio(*args, **kwargs)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # blocking clients
        if not kwargs.get("server_side") and self.server_name:
            kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(*args, **kwargs)


def client_context(
    ca: str, cert: str = "", key: str = "", server_name: str = ""
) -> ssl.SSLContext | bool:
    """What internal calls verify peers with: the cluster CA, presenting our own certificate
    (mutual TLS); without a CA, the system's trust store. ``server_name``: the name to verify
    in peers' certificates instead of the URL's host."""
    if not ca and not server_name:
        return True
    context = _NamedPeers(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.server_name = server_name
    try:
        if ca:
            context.load_verify_locations(ca)
        else:
            context.load_default_certs()
        if cert and key:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files ({ca}, {cert}, {key}): {exc}") from exc
    return context


def require_peer_certificate(enabled: bool) -> Middleware:
    """On the internal sub-application (hops, joins, loads, files): only peers that show a
    certificate of the cluster CA."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if enabled:
            transport = request.transport
            peer = transport.get_extra_info("peercert") if transport is not None else None
            if not peer:
                raise Forbidden(
                    f"{request.path} is for ring members: show a certificate of the cluster CA"
                )
        return await handler(request)

    return middleware
