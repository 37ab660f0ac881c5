"""The sequence protocol of generation, shared by both ends of a step.

A sequence's route is pinned for its life: its KV lives on exactly one replica of every span.
Three calls travel that chain, each nested as hops are (a node does its part, then calls the
node of the next span and hands the answer back):

- ``POST /internal/sequence/open`` (JSON ``{"reserve": tokens, "sampling": {...}}``): every
  span reserves KV for prompt + max_tokens; if one refuses, those before it release theirs.
- ``POST /internal/step`` (a binary v2 body of ``input_ids`` or hidden states, header
  ``X-Appliance-Position``): every span runs the new tokens at that position; the last samples
  and answers ``{"token", "logprob"}``.
- ``POST /internal/sequence/close``: every span frees the sequence (idempotent).
- ``POST /internal/steps`` (protocol 4): the decode steps of several sequences on one chain in
  one call, so that a span's decode batch costs one request per hop rather than one per
  sequence. ``X-Appliance-Sequence-Id`` and ``X-Appliance-Position`` carry comma-separated
  lists, row k of the body's tensor is sequence k's one new token (ids [N, 1] or hidden
  [N, 1, H]); the answer is ``{"results": [...]}`` in row order, each ``{"token",
  "logprob"}`` or ``{"status", "error"}``: one sequence's failure is its own.

Unlike a hop, a failed call is not retried on another replica: no other replica holds this
sequence's KV (rebuilding it there is the replay of a later design).
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import orjson

from appliance.errors import SequenceLost, UpstreamError
from appliance.ring import protocol as rp
from appliance.ring.hop_transport import HopPost, HopTransportError
from runtime.deadline import Deadline

OPEN = "/internal/sequence/open"
STEP = "/internal/step"
CLOSE = "/internal/sequence/close"
STEPS = "/internal/steps"
GROUPED_STEPS_PROTOCOL = 4  # the /internal protocol from which a node answers STEPS


@dataclass(frozen=True)
class SequenceRef:
    """What every call of one sequence carries."""

    model: str
    digest: str
    sequence_id: str
    request_id: str


def sequence_headers(
    ref: SequenceRef,
    step: rp.RouteStep,
    rest: list[rp.RouteStep],
    deadline: Deadline,
    position: int | None = None,
    header_length: int | None = None,
    content_type: str = "application/json",
) -> dict[str, str]:
    headers = {
        rp.MODEL: ref.model,
        rp.DIGEST: ref.digest,
        rp.SPAN: step.span,
        rp.REQUEST_ID: ref.request_id,
        rp.DEADLINE: rp.deadline_header(deadline),
        rp.ROUTE: rp.encode_route(rest),
        rp.SEQUENCE_ID: ref.sequence_id,
        "Content-Type": content_type,
    }
    if position is not None:
        headers[rp.POSITION] = str(position)
    if header_length is not None:
        headers[rp.HEADER_LENGTH] = str(header_length)
    return headers


async def call_chain(
    post: HopPost,
    path: str,
    route: list[rp.RouteStep],
    ref: SequenceRef,
    deadline: Deadline,
    body: bytes,
    position: int | None = None,
    header_length: int | None = None,
    positions: str | None = None,
) -> bytes:
    """One call to the pinned node of ``route[0]`` with the rest of the route; its answer's
    body. A node's error answer is re-raised with its status; an unreachable node is
    SequenceLost. ``positions``: a grouped step's comma-separated positions."""
    step, rest = route[0], route[1:]
    url = step.replicas[0]
    binary = header_length is not None or path in (STEP, STEPS)
    headers = sequence_headers(
        ref,
        step,
        rest,
        deadline,
        position,
        header_length,
        "application/octet-stream" if binary else "application/json",
    )
    if positions is not None:
        headers[rp.POSITION] = positions
    left = deadline.remaining()
    if left <= 0:
        raise SequenceLost(f"sequence {ref.sequence_id}: its deadline passed before {path}")
    try:
        answer = await post(url + path, headers, body, left)
    except (aiohttp.ClientError, HopTransportError, TimeoutError) as exc:
        raise SequenceLost(
            f"sequence {ref.sequence_id}: the node {url} holding segments {step.span} did not "
            f"answer {path} ({type(exc).__name__}: {exc or 'timed out'})"
        ) from exc
    if answer.status != 200:
        raise UpstreamError(answer.status, _error_text(answer.body, answer.status))
    return answer.body


def _error_text(payload: bytes, status: int) -> str:
    try:
        error = orjson.loads(payload).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if isinstance(error, dict):  # an OpenAI-shaped error passed along
        error = error.get("message")
    return str(error) if error else f"HTTP {status}"


async def call_group(
    post: HopPost,
    route: list[rp.RouteStep],
    model: str,
    digest: str,
    sequence_ids: list[str],
    positions: list[int],
    deadline: Deadline,
    body: bytes,
    header_length: int | None,
    request_id: str = "-",
) -> list[dict[str, object]]:
    """One STEPS call for the sequences ``sequence_ids`` along ``route``: each row's result
    (``{"token", "logprob"}`` or ``{"status", "error"}``). An unreachable node or an error
    answer to the whole call raises as ``call_chain`` does, for every row."""
    ref = SequenceRef(model, digest, ",".join(sequence_ids), request_id)
    answer = await call_chain(
        post, STEPS, route, ref, deadline, body, None, header_length,
        positions=",".join(str(p) for p in positions),
    )  # fmt: skip
    try:
        results = orjson.loads(answer)["results"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise UpstreamError(502, f"a grouped step answered no results list: {exc}") from exc
    if not isinstance(results, list) or len(results) != len(sequence_ids):
        raise UpstreamError(502, f"a grouped step of {len(sequence_ids)} rows answered "
                                 f"{len(results) if isinstance(results, list) else 0}")  # fmt: skip
    return [r if isinstance(r, dict) else {"status": 502, "error": "no result"} for r in results]
