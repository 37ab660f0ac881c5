"""The aiohttp application every server starts from: the same middleware stack in the same
order (request id, typed errors, bearer tokens, per-client limit), and the ring's internal
routes as a sub-application under ``/internal/`` with its own guards (ring-member certificates,
signatures), so those guards apply by construction rather than by testing path prefixes.

Handlers read app state through ``request.config_dict``: for an internal route
``request.app`` is the sub-application, which holds no state of its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from appliance.config import ServerConfig
from appliance.http.errors import error_middleware
from appliance.http.logs import request_id_middleware
from appliance.security.auth import auth_middleware, client_limit_middleware, parse_tokens
from appliance.security.signing import signature_middleware, verifier_for
from appliance.security.tls import require_peer_certificate

INTERNAL_PREFIX = "/internal/"


def new_app(config: ServerConfig, internal_routes: Iterable[web.RouteDef] = ()) -> web.Application:
    """The app with the public middleware stack; ``internal_routes`` (paths relative to
    ``/internal/``, e.g. ``/hop``) go to the guarded sub-application."""
    tokens = parse_tokens(config.tokens, config.tokens_file)
    verifier = verifier_for(config)
    app = web.Application(
        middlewares=[
            request_id_middleware,
            error_middleware,
            # signed internal calls need no bearer token: the signature is the stronger proof
            auth_middleware(tokens, config.metrics_public, signed_internal=verifier is not None),
            client_limit_middleware(config.max_concurrent_per_client),
        ],
        client_max_size=config.max_body_bytes,
    )
    internal = web.Application(
        middlewares=[
            # the outer layer first: only holders of a cluster certificate, then signatures
            require_peer_certificate(bool(config.tls_ca and config.tls_cert)),
            signature_middleware(verifier),
        ],
        client_max_size=config.max_body_bytes,
    )
    internal.add_routes(list(internal_routes))
    app.add_subapp(INTERNAL_PREFIX.rstrip("/"), internal)
    return app
