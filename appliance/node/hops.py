"""A hop on a node: run the span the hop names, then pass the outputs straight to a replica of
the next span (nested), and hand the final answer back upstream."""

from __future__ import annotations

import time

from appliance.errors import DigestMismatch
from appliance.node.calls import NodeCall, Reply
from appliance.node.keys import CONFIG, HOPS, METRICS, REGISTRY
from appliance.ring import protocol as rp
from runtime.codec import (
    decode_checked_request,
    encode_request,
    encode_response,
    parse_header_length,
)
from runtime.errors import DeadlineExceeded, ModelNotFound, ModelNotReady
from runtime.registry import LoadedModel, ModelRegistry


def held_span(
    registry: ModelRegistry, model: str, digest: str, first: int, last: int
) -> LoadedModel:
    """The span the hop asks for, with exactly those bytes; DigestMismatch (409) otherwise,
    which tells the sender to try another replica."""
    try:
        loaded = registry.get(rp.slot_name(model, first, last, digest))
    except (ModelNotFound, ModelNotReady) as exc:  # never held, unloaded, or still loading
        raise DigestMismatch(
            f"this node holds no span {first}-{last} of {model} with digest {digest[:19]} "
            f"({exc}); the route is stale"
        ) from None
    if loaded.digest != digest:
        raise DigestMismatch(
            f"this node holds {model} segments {first}-{last} with digest {loaded.digest}, "
            f"the hop asked for {digest}"
        )
    return loaded


async def hop(call: NodeCall) -> Reply:
    state, headers, body = call.state, call.headers, call.body
    model = headers.get(rp.MODEL, "")
    digest = headers.get(rp.DIGEST, "")
    first, last = rp.parse_span(headers.get(rp.SPAN))
    deadline = rp.parse_deadline(headers.get(rp.DEADLINE))
    route = rp.decode_route(headers.get(rp.ROUTE))
    request_id = headers.get(rp.REQUEST_ID, "-")
    loaded = held_span(state[REGISTRY], model, digest, first, last)
    if deadline.expired():
        raise DeadlineExceeded(f"request {request_id}: deadline passed before span {first}-{last}")
    config = state[CONFIG]
    decoded = decode_checked_request(
        body,
        parse_header_length(headers.get(rp.HEADER_LENGTH), len(body)),
        loaded.signature,
        config.max_tensor_elements,
    )
    started = time.perf_counter()
    outputs = await loaded.infer(decoded.inputs, None, deadline)
    computed = call.compute_s = time.perf_counter() - started
    state[METRICS].observe_hop_compute("hop", computed)
    if route:
        payload, length = encode_request(outputs)
        answer, answer_length = await state[HOPS].call(
            route, model, digest, request_id, deadline, payload, length
        )
    else:
        names = loaded.signature.output_names()
        answer, answer_length = encode_response(
            model, loaded.version, request_id, [(n, outputs[n]) for n in names], [True] * len(names)
        )
    return Reply(answer, "application/octet-stream", answer_length)
