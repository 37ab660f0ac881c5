"""The internal hop protocol shared by coordinator and nodes (docs/protocol.md, "Hops").

A hop is ``POST /internal/hop`` with a binary v2 body and these headers. The route lists, for
every later span, its live replicas in preference order; the receiver runs its own span, then
calls one replica of the next span with the rest of the route, and hands the final answer back.

Deadlines are ``runtime.deadline.Deadline`` (monotonic) everywhere in a process; this module is
the only place that turns one into its wire form (seconds since the epoch) and back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, NewType

from appliance.errors import BadRequest
from appliance.headers import (
    DEADLINE,
    DIGEST,
    MODEL,
    POSITION,
    REQUEST_ID,
    ROUTE,
    SEQUENCE_ID,
    SIGNED_HEADERS,
    SPAN,
)
from runtime.codec import HEADER_LENGTH
from runtime.deadline import Deadline

NodeId = NewType("NodeId", str)  # a member's stable id ("local-0", "node-1a2b3c4d")
PeerUrl = NewType("PeerUrl", str)  # a member's base URL, as routes carry it

__all__ = [
    "DEADLINE",
    "DIGEST",
    "HEADER_LENGTH",
    "MODEL",
    "POSITION",
    "REQUEST_ID",
    "ROUTE",
    "SEQUENCE_ID",
    "SIGNED_HEADERS",
    "SPAN",
    "NodeId",
    "PeerUrl",
    "RouteStep",
]


@dataclass(frozen=True)
class RouteStep:
    first: int
    last: int
    replicas: tuple[PeerUrl, ...]  # preference order

    @property
    def span(self) -> str:
        return f"{self.first}-{self.last}"


def slot_name(model: str, first: int, last: int, digest: str) -> str:
    """The registry key of a span held by a node: its bytes are part of it, so a node holds
    two versions of a span side by side while a switch between them is under way."""
    return f"{model}#{first}-{last}@{digest.removeprefix('sha256:')[:12]}"


def slot_prefix(model: str, first: int, last: int) -> str:
    """What every version of one span's slot name starts with."""
    return f"{model}#{first}-{last}@"


def encode_route(route: list[RouteStep]) -> str:
    return json.dumps([[s.first, s.last, list(s.replicas)] for s in route], separators=(",", ":"))


def decode_route(text: str | None) -> list[RouteStep]:
    if not text:
        return []
    try:
        raw = json.loads(text)
        return [
            RouteStep(int(a), int(b), tuple(PeerUrl(str(r)) for r in reps)) for a, b, reps in raw
        ]
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"{ROUTE} must be a JSON list of [first, last, [replica URLs]]") from exc


def parse_span(text: str | None) -> tuple[int, int]:
    try:
        first, last = (int(part) for part in (text or "").split("-"))
    except ValueError:
        raise BadRequest(f"{SPAN} must be 'first-last' segment numbers, got {text!r}") from None
    return first, last


def parse_deadline(text: str | None) -> Deadline:
    """The wire deadline as a Deadline on this process's clock: ``+S``, the seconds left when
    the caller sent it (what members send since protocol 3: no two clocks need agree), or
    seconds since the epoch (protocol 2 peers: it needs clocks that agree)."""
    value = text or ""
    try:
        seconds = float(value)
    except ValueError:
        raise BadRequest(
            f"{DEADLINE} must be +SECONDS (the time left) or seconds since the epoch, got {text!r}"
        ) from None
    if value.startswith("+"):
        return Deadline.after(seconds)
    return Deadline(time.monotonic() + (seconds - time.time()))


def deadline_header(deadline: Deadline) -> str:
    """The time left, not an instant: a node whose clock is off keeps the same budget (the
    transit of the hop itself, well under a millisecond to a few, is not counted)."""
    return f"+{max(0.0, deadline.remaining()):.6f}"


def hop_headers(
    model: str,
    digest: str,
    step: RouteStep,
    request_id: str,
    deadline: Deadline,
    rest: list[RouteStep],
    header_length: int | None,
) -> dict[str, Any]:
    headers = {
        MODEL: model,
        DIGEST: digest,
        SPAN: step.span,
        REQUEST_ID: request_id,
        DEADLINE: deadline_header(deadline),
        ROUTE: encode_route(rest),
        "Content-Type": "application/octet-stream",
    }
    if header_length is not None:
        headers[HEADER_LENGTH] = str(header_length)
    return headers
