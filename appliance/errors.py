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
