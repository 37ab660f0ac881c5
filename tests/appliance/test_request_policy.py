"""Headers and per-model cache settings, parsed as plain data."""

from __future__ import annotations

import pytest

from appliance.coordinator.request_policy import (
    ModelCachePolicy,
    model_cache_policies,
    parse_cache_control,
    wants_async,
)
from appliance.errors import BadRequest, ConfigError


def test_cache_control() -> None:
    assert parse_cache_control(None) == parse_cache_control("max-age=0")
    assert not parse_cache_control("no-cache").read and parse_cache_control("no-cache").write
    both = parse_cache_control("No-Cache, no-store")
    assert not both.read and not both.write


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ("respond-async", True),
        ("wait=10, respond-async", True),
        ("return=minimal", False),
        ('respond-async; foo="a b"', True),
    ],
)
def test_prefer(header: str | None, expected: bool) -> None:
    assert wants_async(header) is expected


@pytest.mark.parametrize("header", ["", "respond async", "=x", "respond-async,,", '"x"'])
def test_malformed_prefer_is_refused(header: str) -> None:
    with pytest.raises(BadRequest, match="malformed Prefer"):
        wants_async(header)


def test_per_model_cache_policies() -> None:
    policies, default = model_cache_policies(["demo=off", "minilm=60"], 0)
    assert policies == {"demo": ModelCachePolicy(False, None), "minilm": ModelCachePolicy(True, 60)}
    assert default == ModelCachePolicy(True, None)
    for bad in (["demo"], ["=3"], ["demo=soon"]):
        with pytest.raises(ConfigError, match="NAME=off or NAME=SECONDS"):
            model_cache_policies(bad, 0)
