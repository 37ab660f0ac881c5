"""The internal hop protocol shared by coordinator and nodes (DESIGN.md "Inside the ring").

A hop is ``POST /internal/hop`` with a binary v2 body and these headers. The route lists, for
every later span, its live replicas in preference order; the receiver runs its own span, then
calls one replica of the next span with the rest of the route, and hands the final answer back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from appliance.errors import BadRequest

MODEL = "X-Appliance-Model"
DIGEST = "X-Appliance-Digest"
SPAN = "X-Appliance-Span"  # "first-last" segments the receiver must run
REQUEST_ID = "X-Request-Id"
DEADLINE = "X-Appliance-Deadline"  # absolute, seconds since the epoch
ROUTE = "X-Appliance-Route"
SEQUENCE_ID = "X-Appliance-Sequence-Id"  # reserved for generation with a KV cache per span
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class RouteStep:
    first: int
    last: int
    replicas: tuple[str, ...]  # base URLs, preference order

    @property
    def span(self) -> str:
        return f"{self.first}-{self.last}"


def slot_name(model: str, first: int, last: int) -> str:
    """The registry key of a span held by a node."""
    return f"{model}#{first}-{last}"


def encode_route(route: list[RouteStep]) -> str:
    return json.dumps([[s.first, s.last, list(s.replicas)] for s in route], separators=(",", ":"))


def decode_route(text: str | None) -> list[RouteStep]:
    if not text:
        return []
    try:
        raw = json.loads(text)
        return [RouteStep(int(a), int(b), tuple(str(r) for r in reps)) for a, b, reps in raw]
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"{ROUTE} must be a JSON list of [first, last, [replica URLs]]") from exc


def parse_span(text: str | None) -> tuple[int, int]:
    try:
        first, last = (int(part) for part in (text or "").split("-"))
    except ValueError:
        raise BadRequest(f"{SPAN} must be 'first-last' segment numbers, got {text!r}") from None
    return first, last


def parse_deadline(text: str | None) -> float:
    try:
        deadline = float(text or "")
    except ValueError:
        raise BadRequest(f"{DEADLINE} must be seconds since the epoch, got {text!r}") from None
    return deadline


def remaining(deadline: float) -> float:
    return deadline - time.time()


def hop_headers(
    model: str,
    digest: str,
    step: RouteStep,
    request_id: str,
    deadline: float,
    rest: list[RouteStep],
    header_length: int | None,
) -> dict[str, Any]:
    headers = {
        MODEL: model,
        DIGEST: digest,
        SPAN: step.span,
        REQUEST_ID: request_id,
        DEADLINE: f"{deadline:.6f}",
        ROUTE: encode_route(rest),
        "Content-Type": "application/octet-stream",
    }
    if header_length is not None:
        headers[HEADER_LENGTH] = str(header_length)
    return headers
