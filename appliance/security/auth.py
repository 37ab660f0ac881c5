"""Bearer tokens with roles on the public API; constant-time comparison; one middleware.

Roles: ``infer`` (inference, model metadata, the caller's own jobs) and ``admin`` (everything,
including the repository, the cluster view, statistics and metrics). Health is always open.
With no token configured, auth is off (and the server says so at start).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from appliance.config import entries_with_file
from appliance.errors import ConfigError, Forbidden, Unauthorized

log = logging.getLogger(__name__)

ROLES = ("infer", "admin")
OPEN = "open"


@dataclass(frozen=True)
class Token:
    role: str
    secret: bytes


@dataclass(frozen=True)
class Caller:
    """Who sent a request: its token's fingerprint and role ("" for both when auth is off)."""

    id: str = ""
    role: str = ""

    def may_see(self, owner: str) -> bool:
        """Whether a job submitted by ``owner`` is this caller's to read or cancel: its own,
        any for an admin, and every job when auth is off (nobody owns one then)."""
        return not owner or owner == self.id or self.role == "admin"


ANONYMOUS = Caller()
CALLER = web.RequestKey("caller", Caller)


def caller_of(request: web.Request) -> Caller:
    return request.get(CALLER, ANONYMOUS)


def client_identity(request: web.Request) -> str:
    """Who a request counts against for per-client limits: its token's caller, else its peer
    address (apps on one host without tokens share one identity)."""
    return caller_of(request).id or request.remote or "-"


def parse_tokens(entries: list[str], tokens_file: str) -> list[Token]:
    """``ROLE:TOKEN`` entries from the config and from a file (one per line, # comments)."""
    lines = entries_with_file(entries, tokens_file, "tokens_file")
    tokens = []
    for line in lines:
        role, sep, secret = line.partition(":")
        if not sep or role not in ROLES or len(secret) < 16:
            raise ConfigError(
                f"token entry {role + ':...' if sep else '(no role)'} is not accepted: give "
                f"ROLE:TOKEN with ROLE in {', '.join(ROLES)} and a token of 16+ characters"
            )
        tokens.append(Token(role, secret.encode()))
    return tokens


def required_role(method: str, path: str, metrics_public: bool) -> str:
    """The role a path needs (a pure function: tested without a server)."""
    if path.startswith("/v2/health/") or path == "/":
        return OPEN  # the status page asks for a token itself; its data endpoints need admin
    if path == "/metrics":
        return OPEN if metrics_public else "admin"
    if (
        path.startswith("/v2/repository/")
        or path == "/v2/cluster"
        or path.endswith("/stats")
        or path.startswith("/internal/")
    ):
        return "admin"
    return "infer"


def internal_headers(cluster_token: str) -> dict[str, str]:
    """What this process sends on internal calls (hops, joins, loads, file fetches)."""
    return {"Authorization": f"Bearer {cluster_token}"} if cluster_token else {}


def fingerprint(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()[:16]


def authenticate(tokens: list[Token], header: str | None) -> Token | None:
    """The token the header presents, compared in constant time against every token."""
    if not header or not header.startswith("Bearer "):
        return None
    presented = header[len("Bearer ") :].strip().encode()
    found = None
    for token in tokens:  # no early exit: the time taken does not tell which one matched
        if hmac.compare_digest(presented, token.secret):
            found = token
    return found


def auth_middleware(
    tokens: list[Token], metrics_public: bool, signed_internal: bool = False
) -> Middleware:
    if not tokens:
        log.warning("auth is OFF: no tokens configured; anyone who reaches this port may use it")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not tokens:
            request[CALLER] = ANONYMOUS
            return await handler(request)
        role = required_role(request.method, request.path, metrics_public)
        if role == OPEN or (signed_internal and request.path.startswith("/internal/")):
            request[CALLER] = ANONYMOUS
            return await handler(request)
        header = request.headers.get("Authorization")
        token = authenticate(tokens, header)
        if token is None and header and header.startswith("Bearer "):
            raise Unauthorized("token not accepted: it matches none of this server's tokens")
        if token is None:
            raise Unauthorized("a bearer token is required: send 'Authorization: Bearer <token>'")
        if role == "admin" and token.role != "admin":
            raise Forbidden(
                f"{request.path} needs an admin token; this token has role {token.role}"
            )
        request[CALLER] = Caller(fingerprint(token.secret), token.role)
        return await handler(request)

    return middleware


def client_limit_middleware(limit: int) -> Middleware:
    """At most ``limit`` requests in flight per client (token, or address when auth is off),
    so one busy or slow client cannot take every slot of the queue from the others."""
    in_flight: dict[str, int] = {}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if limit <= 0 or request.path.startswith(("/internal/", "/v2/health/")):
            return await handler(request)
        client = client_identity(request)
        if in_flight.get(client, 0) >= limit:
            from appliance.errors import TooManyRequests

            raise TooManyRequests(
                f"this client has {limit} requests in flight, the most allowed; retry later"
            )
        in_flight[client] = in_flight.get(client, 0) + 1
        try:
            return await handler(request)
        finally:
            in_flight[client] -= 1
            if not in_flight[client]:
                del in_flight[client]

    return middleware
