"""Per-request choices read from HTTP headers and per-model cache settings (pure functions)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.errors import BadRequest, ConfigError

# RFC 7240 preferences: token ["=" (token / quoted-string)], separated by "," or ";"
_PREFERENCE = re.compile(r'\s*[!#$%&\'*+\-.^_`|~0-9A-Za-z]+(\s*=\s*("[^"]*"|[^\s,;"]+))?\s*')


@dataclass(frozen=True)
class CacheControl:
    read: bool = True  # no-cache: do not answer from the cache
    write: bool = True  # no-store: do not keep this answer


def parse_cache_control(value: str | None) -> CacheControl:
    tokens = {t.strip().lower() for t in (value or "").split(",")}
    return CacheControl(read="no-cache" not in tokens, write="no-store" not in tokens)


def wants_async(prefer: str | None) -> bool:
    """True for ``Prefer: respond-async``; BadRequest for a header that is not RFC 7240."""
    if prefer is None:
        return False
    parts = re.split(r"[,;]", prefer)
    if not prefer.strip() or any(not _PREFERENCE.fullmatch(part) for part in parts):
        raise BadRequest(
            f"malformed Prefer header {prefer!r}; accepted: 'respond-async' (RFC 7240 tokens)"
        )
    return any(part.strip().split("=")[0].lower() == "respond-async" for part in parts)


@dataclass(frozen=True)
class ModelCachePolicy:
    enabled: bool
    ttl_s: float | None


def model_cache_policies(
    entries: list[str], default_ttl_s: float
) -> tuple[dict[str, ModelCachePolicy], ModelCachePolicy]:
    """``["demo=off", "minilm=60"]`` -> per-model policies, and the default for the others."""
    default = ModelCachePolicy(True, default_ttl_s or None)
    policies: dict[str, ModelCachePolicy] = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        if not sep or not name:
            raise ConfigError(f"cache_models entry {entry!r}: accepted NAME=off or NAME=SECONDS")
        if value.strip().lower() == "off":
            policies[name] = ModelCachePolicy(False, None)
            continue
        try:
            ttl = float(value)
        except ValueError:
            raise ConfigError(
                f"cache_models entry {entry!r}: accepted NAME=off or NAME=SECONDS"
            ) from None
        policies[name] = ModelCachePolicy(True, ttl or None)
    return policies, default
