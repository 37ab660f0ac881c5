"""Typed errors of the appliance package (HTTP-facing problems that are not the runtime's)."""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of the appliance's own errors."""


class BadRequest(ApplianceError):
    """The HTTP request itself is malformed (maps to 400)."""


class BodyTooLarge(ApplianceError):
    """The body exceeds the limit, before or after decompression (maps to 413)."""


class UnsupportedMediaType(ApplianceError):
    """A Content-Encoding we do not decode (maps to 415)."""


class ConfigError(ApplianceError):
    """A config file or flag is invalid; the message names the key and what is accepted."""


class PlacementError(ApplianceError):
    """A placement request that is invalid in itself, e.g. more stages than segments (400)."""


class DoesNotFit(PlacementError):
    """The ring's nodes cannot hold what is asked (memory, replicas on distinct nodes): 507.
    Not a "retry later" 503: nothing changes until an operator adds memory or nodes, frees a
    model, or asks for less, so hop clients and job runners never retry it."""


class NoLiveReplica(ApplianceError):
    """Every replica of a span failed or none is alive (maps to 503)."""


class SequenceLost(ApplianceError):
    """A node holding a span of a live sequence did not answer a step (dead, hung, cut off):
    the sequence cannot go on there (maps to 503)."""


class DigestMismatch(ApplianceError):
    """A hop asked for other bytes than this node holds (maps to 409)."""


class NotMember(ApplianceError):
    """A heartbeat from a node the coordinator does not know (maps to 404: join again)."""


class MemberConflict(ApplianceError):
    """A second live node with the same id tried to join (maps to 409)."""


class UpstreamError(ApplianceError):
    """A node answered a hop with a final error (e.g. 400 for values its span rejects); the
    status travels back to the client unchanged."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Unauthorized(ApplianceError):
    """No valid bearer token (maps to 401 with WWW-Authenticate)."""


class Forbidden(ApplianceError):
    """A valid token without the role the path needs (maps to 403)."""


class TooManyRequests(ApplianceError):
    """This client has too many requests in flight (maps to 429 with Retry-After)."""

    retry_after_s = 1.0
