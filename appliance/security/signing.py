"""HMAC signatures on internal calls (hops, joins, heartbeats, loads, file fetches).

A ring member signs every internal request with the cluster secret over what an attacker on the
network would want to change or replay: the method, the path and query, a timestamp, a nonce, the
sender's node id, the routing headers (model, digest, span, deadline, route) and the body's
sha256. The receiver accepts a timestamp within ``window_s`` of its clock and each nonce once
(remembered for twice the window), so a captured call cannot be replayed: a replayed heartbeat
cannot keep a dead node alive. Two secrets are accepted at once so the secret can be rotated
without downtime: sign with the new one first on every member, then drop the old one.

The header is ``X-Appliance-Signature: v1 key=<id>,ts=<unix>,nonce=<hex>,node=<sender>,sig=<hex>``
where ``key`` names the secret (a fingerprint, so the receiver computes one HMAC, not two).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from aiohttp import ClientHandlerType, ClientMiddlewareType, ClientRequest, ClientResponse, web
from aiohttp.typedefs import Handler, Middleware

from appliance.config import ServerConfig, entries_with_file
from appliance.errors import ConfigError, Unauthorized
from appliance.headers import SIGNED_HEADERS

log = logging.getLogger(__name__)
HEADER_SIGNATURE = "X-Appliance-Signature"
MIN_SECRET_CHARS = 32
SENDER = web.RequestKey("signed_sender", str)  # the node id a verified signature names
_SENDER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_FIELDS = ("key", "ts", "nonce", "node", "sig")


def parse_secrets(entries: list[str], secrets_file: str) -> list[bytes]:
    """The cluster secrets from the config and a file (one per line, # comments): the first
    signs, every one is accepted. At most two, the pair of a rotation."""
    lines = entries_with_file(entries, secrets_file, "cluster_secrets_file")
    if len(lines) > 2:
        raise ConfigError(
            f"{len(lines)} cluster secrets given; accepted: one, or two while rotating "
            "(the first signs, both are accepted)"
        )
    for line in lines:
        if len(line) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"a cluster secret of {len(line)} characters is too short; give "
                f"{MIN_SECRET_CHARS} or more (e.g. `openssl rand -hex 32`)"
            )
    return [line.encode() for line in lines]


def new_secret() -> str:
    return os.urandom(32).hex()


def key_id(secret: bytes) -> str:
    return hashlib.sha256(b"appliance-cluster-key\0" + secret).hexdigest()[:12]


def canonical(
    method: str,
    path_qs: str,
    timestamp: str,
    nonce: str,
    sender: str,
    headers: Mapping[str, str],
    body: bytes,
    signed_headers: Sequence[str] = SIGNED_HEADERS,
) -> bytes:
    """The bytes the HMAC covers; both sides build them from what travels on the wire: the
    method, path, timestamp, nonce, sender, the ring's routing headers and the body's hash."""
    # stripped: HTTP parsers drop the whitespace around a header value on the way
    routing = [f"{name.lower()}:{headers.get(name, '').strip()}" for name in signed_headers]
    parts = [method.upper(), path_qs, timestamp, nonce, sender, *routing]
    parts.append(hashlib.sha256(body).hexdigest())
    return "\n".join(parts).encode()


@dataclass
class Signer:
    secret: bytes
    sender: str
    clock: Callable[[], float] = time.time
    signed_headers: Sequence[str] = SIGNED_HEADERS

    def header(self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes) -> str:
        timestamp = f"{self.clock():.3f}"
        nonce = os.urandom(12).hex()
        message = canonical(
            method, path_qs, timestamp, nonce, self.sender, headers, body, self.signed_headers
        )
        sig = hmac.new(self.secret, message, hashlib.sha256).hexdigest()
        return (
            f"v1 key={key_id(self.secret)},ts={timestamp},nonce={nonce},"
            f"node={self.sender},sig={sig}"
        )

    def client_middleware(self) -> ClientMiddlewareType:
        """An aiohttp client middleware: every request of the session is signed (retries too,
        each with its own nonce)."""

        async def sign(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
            payload = request.body
            body = payload if isinstance(payload, bytes) else await payload.as_bytes()
            request.headers[HEADER_SIGNATURE] = self.header(
                request.method, request.url.raw_path_qs, request.headers, body
            )
            return await handler(request)

        return sign


@dataclass
class Verifier:
    """Checks signatures; remembers the nonces it accepted until they are too old to replay."""

    secrets: list[bytes]
    window_s: float = 30.0
    clock: Callable[[], float] = time.time
    signed_headers: Sequence[str] = SIGNED_HEADERS
    _by_key: dict[str, bytes] = field(init=False)
    _seen: dict[str, float] = field(init=False, default_factory=dict)
    _expiry: collections.deque[tuple[float, str]] = field(
        init=False, default_factory=collections.deque
    )

    def __post_init__(self) -> None:
        self._by_key = {key_id(s): s for s in self.secrets}

    def verify(self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes) -> str:
        """The sender's node id, or Unauthorized saying what was wrong."""
        raw = headers.get(HEADER_SIGNATURE)
        if not raw:
            raise Unauthorized(
                f"internal calls must be signed with the cluster secret ({HEADER_SIGNATURE})"
            )
        fields = _parse(raw)
        secret = self._by_key.get(fields["key"])
        if secret is None:
            raise Unauthorized("the call is signed with a cluster secret this process lacks")
        if not _SENDER_ID.match(fields["node"]):
            raise Unauthorized("the signature names no valid sender node id")
        message = canonical(
            method,
            path_qs,
            fields["ts"],
            fields["nonce"],
            fields["node"],
            headers,
            body,
            self.signed_headers,
        )
        expected = hmac.new(secret, message, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, fields["sig"]):
            raise Unauthorized("the signature does not match the call (altered or wrong secret)")
        try:
            sent_at = float(fields["ts"])
        except ValueError:
            raise Unauthorized("the signature's timestamp is not a number") from None
        now = self.clock()
        if abs(now - sent_at) > self.window_s:
            raise Unauthorized(
                f"the signed call is {now - sent_at:+.1f} s from this clock; accepted within "
                f"{self.window_s:g} s (stale, replayed, or clocks out of sync)"
            )
        self._forget_old(now)
        if fields["nonce"] in self._seen:
            raise Unauthorized("this signed call was already received (a replay)")
        self._seen[fields["nonce"]] = now + 2 * self.window_s
        self._expiry.append((now + 2 * self.window_s, fields["nonce"]))
        return fields["node"]

    def _forget_old(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, nonce = self._expiry.popleft()
            self._seen.pop(nonce, None)

    @property
    def remembered(self) -> int:
        return len(self._seen)


def _parse(raw: str) -> dict[str, str]:
    version, _, rest = raw.strip().partition(" ")
    if version != "v1":
        raise Unauthorized(f"signature version {version!r} is not accepted; accepted: v1")
    fields: dict[str, str] = {}
    for item in rest.split(","):
        name, sep, value = item.strip().partition("=")
        if sep and name in _FIELDS:
            fields[name] = value
    missing = [name for name in _FIELDS if not fields.get(name)]
    if missing:
        raise Unauthorized(f"the signature lacks {', '.join(missing)}")
    return fields


def signature_middleware(verifier: Verifier | None) -> Middleware:
    """On the internal sub-application: a valid signature when cluster secrets are configured."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if verifier is None:
            return await handler(request)
        body = await request.read()  # kept by aiohttp: the handler reads the same bytes
        try:
            sender = verifier.verify(request.method, request.raw_path, request.headers, body)
        except Unauthorized as exc:
            # a security event an operator wants to see (a stray member, a replay, clock skew)
            log.warning(
                "refused %s %s from %s: %s", request.method, request.path, request.remote, exc
            )
            raise
        request[SENDER] = sender
        return await handler(request)

    return middleware


def signer_for(config: ServerConfig, sender: str) -> Signer | None:
    """How this process signs its internal calls; None when no cluster secret is configured."""
    secrets = parse_secrets(config.cluster_secrets, config.cluster_secrets_file)
    return Signer(secrets[0], sender) if secrets else None


def verifier_for(config: ServerConfig) -> Verifier | None:
    secrets = parse_secrets(config.cluster_secrets, config.cluster_secrets_file)
    return Verifier(secrets, config.signature_window_s) if secrets else None


def check_sender(request: web.Request, node_id: object) -> None:
    """A member speaks only for itself: the node id in a join, heartbeat or leave must be the
    one its signature names (signing off: nothing to check)."""
    sender = request.get(SENDER)
    if sender is not None and sender != str(node_id):
        raise Unauthorized(f"node {sender!r} signed a call on behalf of node {node_id!r}")
