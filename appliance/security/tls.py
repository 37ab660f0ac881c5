"""Native HTTPS for coordinator and nodes, and mutual TLS between them when a CA is given."""

from __future__ import annotations

import ssl

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


def client_context(ca: str, cert: str = "", key: str = "") -> ssl.SSLContext | bool:
    """What internal calls verify peers with: the cluster CA, presenting our own certificate
    (mutual TLS); without a CA, the system's trust store."""
    if not ca:
        return True
    context = ssl.create_default_context(cafile=ca)
    if cert and key:
        context.load_cert_chain(cert, key)
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
