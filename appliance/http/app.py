"""The aiohttp application every server starts from: the same middleware stack in the same
order (connection tracking, request id, typed errors, bearer tokens, admission by load,
per-client limit, the runner's metrics on /metrics), and the ring's internal
routes as a sub-application under ``/internal/`` with its own guards (ring-member certificates,
signatures), so those guards apply by construction rather than by testing path prefixes.

Handlers read app state through ``request.config_dict``: for an internal route
``request.app`` is the sub-application, which holds no state of its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from appliance.config import ServerConfig
from appliance.http.admission import admission_middleware
from appliance.http.errors import error_middleware
from appliance.http.guards import GUARDS, Guards, connection_middleware, member_middleware
from appliance.http.logs import request_id_middleware
from appliance.http.server_metrics import metrics_middleware
from appliance.http.server_time import server_time_middleware
from appliance.security.auth import auth_middleware, client_limit_middleware, parse_tokens
from appliance.security.signing import signature_middleware, verifier_for
from appliance.security.tls import require_peer_certificate

INTERNAL_PREFIX = "/internal/"


def new_app(config: ServerConfig, internal_routes: Iterable[web.RouteDef] = ()) -> web.Application:
    """The app with the public middleware stack; ``internal_routes`` (paths relative to
    ``/internal/``, e.g. ``/hop``) go to the guarded sub-application."""
    tokens = parse_tokens(config.tokens, config.tokens_file)
    verifier = verifier_for(config)
    guards = Guards.of(config)  # started with the socket, by the process runner
    member_certificates = bool(config.tls_ca and config.tls_cert)
    guards.tracker.member_certificates = member_certificates
    app = web.Application(
        middlewares=[
            connection_middleware(guards.tracker),
            request_id_middleware,
            error_middleware,
            # signed internal calls need no bearer token: the signature is the stronger proof
            auth_middleware(tokens, config.metrics_public, signed_internal=verifier is not None),
            # after auth (no body is read for a caller without a token), before the body is
            # read for one over the limit: the cheapest 503 there is
            admission_middleware(guards.admission, config.max_body_bytes),
            client_limit_middleware(config.max_concurrent_per_client),
            metrics_middleware(guards),
        ],
        client_max_size=config.max_body_bytes,
    )
    app[GUARDS] = guards
    internal = web.Application(
        middlewares=[
            # the outer layer first: only holders of a cluster certificate, then signatures
            require_peer_certificate(member_certificates),
            signature_middleware(verifier),
            member_middleware(guards.tracker),  # a verified call: its connection is a member's
            server_time_middleware,  # innermost: the callee's own time, its body already in
        ],
        client_max_size=config.max_body_bytes,
    )
    internal.add_routes(list(internal_routes))
    app.add_subapp(INTERNAL_PREFIX.rstrip("/"), internal)
    return app
