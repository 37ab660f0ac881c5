"""A node's part in generation: open, step and close the sequences of the generation spans it
holds, each call nested along the sequence's pinned route (``appliance.ring.sequences``).

Only the first span's input ids and hidden states cross between nodes; the last span samples
and answers the token id and its logprob, which travel back up the chain unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

from appliance.errors import BadRequest, DigestMismatch, SequenceLost, UpstreamError
from appliance.http.errors import status_of
from appliance.node.calls import NodeCall, Reply, Run, http_route
from appliance.node.keys import CLIENTS, CONFIG, DECODERS, METRICS
from appliance.ring import protocol as rp
from appliance.ring.sequences import CLOSE, OPEN, STEP, SequenceRef, call_chain, call_group
from runtime.codec import decode_request, encode_request, parse_header_length
from runtime.decoder_registry import DecoderRegistry
from runtime.decoder_slots import DecoderSlot
from runtime.errors import ModelNotFound
from runtime.sampling import sampling_params

log = logging.getLogger(__name__)


Headers = CIMultiDictProxy[str]


def _held(registry: DecoderRegistry, headers: Headers) -> tuple[DecoderSlot, SequenceRef]:
    sequence_id = headers.get(rp.SEQUENCE_ID, "")
    if not sequence_id:
        raise BadRequest(f"a sequence call needs {rp.SEQUENCE_ID}")
    slot = _slot(registry, headers)
    model = headers.get(rp.MODEL, "")
    ref = SequenceRef(model, slot.digest, sequence_id, headers.get(rp.REQUEST_ID, "-"))
    return slot, ref


def _slot(registry: DecoderRegistry, headers: Headers) -> DecoderSlot:
    model = headers.get(rp.MODEL, "")
    digest = headers.get(rp.DIGEST, "")
    first, last = rp.parse_span(headers.get(rp.SPAN))
    try:
        slot = registry.get(rp.slot_name(model, first, last, digest))
    except ModelNotFound:
        raise DigestMismatch(
            f"this node holds no generation span {first}-{last} of {model}; the route is stale"
        ) from None
    if slot.digest != digest:
        raise DigestMismatch(
            f"this node holds {model} segments {first}-{last} with digest {slot.digest}, the "
            f"call asked for {digest}"
        )
    return slot


def _route(headers: Headers) -> tuple[list[rp.RouteStep], Any]:
    return (
        rp.decode_route(headers.get(rp.ROUTE)),
        rp.parse_deadline(headers.get(rp.DEADLINE)),
    )


def _post(state: Any) -> Any:
    return state[CLIENTS].hop


async def sequence_open(call: NodeCall) -> Reply:
    state, body = call.state, call.body
    slot, ref = _held(state[DECODERS], call.headers)
    route, deadline = _route(call.headers)
    raw = call.json_object()
    reserve = raw.get("reserve")
    if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 1:
        raise BadRequest(f"open needs reserve: a positive number of tokens, got {reserve!r}")
    prefix_ids = _prefix_ids(raw.get("prefix_ids"), slot.span.info.vocab_size)
    sampling = None
    if slot.span.is_last:
        sampling = sampling_params(raw.get("sampling") or {}, slot.span.info.defaults)
    # a full span queues the open (bounded) until a sequence frees its place or KV
    cached = await slot.open(ref.sequence_id, reserve, sampling, time.monotonic(), prefix_ids)
    try:
        if route:
            answer = await call_chain(_post(state), OPEN, route, ref, deadline, body)
            cached = min(cached, _cached_tokens(answer))  # the chain starts where all can
    except BaseException:
        slot.close(ref.sequence_id)  # the others before it release theirs the same way
        raise
    return Reply.json({"opened": True, "cached_tokens": cached})


def _prefix_ids(value: Any, vocab: int) -> list[int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in value)
    ):
        raise BadRequest(
            f"prefix_ids must be the prompt's token ids: a non-empty list of integers in "
            f"0..{vocab - 1}; got {str(value)[:80]}"
        )
    return value


def _cached_tokens(answer: bytes) -> int:
    """The downstream chain's cached tokens; a node that does not say has none."""
    try:
        got = orjson.loads(answer).get("cached_tokens", 0)
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    return got if isinstance(got, int) and not isinstance(got, bool) and got >= 0 else 0


def _step_inputs(call: NodeCall, slot: DecoderSlot) -> tuple[Any, list[str]]:
    """The span's input tensor from a step's binary body (None if absent), and every name."""
    decoded = decode_request(
        call.body,
        parse_header_length(call.headers.get(rp.HEADER_LENGTH), len(call.body)),
        call.state[CONFIG].max_tensor_elements,
    )
    return decoded.inputs.get(slot.span.input_name), list(decoded.inputs)


async def step(call: NodeCall) -> Reply:
    state = call.state
    slot, ref = _held(state[DECODERS], call.headers)
    route, deadline = _route(call.headers)
    try:
        position = int(call.headers.get(rp.POSITION, ""))
    except ValueError:
        raise BadRequest(f"a step needs {rp.POSITION}: the position of its first token") from None
    inputs, names = _step_inputs(call, slot)
    if inputs is None:
        raise BadRequest(
            f"a step of segments {slot.first}-{slot.last} carries {slot.span.input_name}, got "
            f"{', '.join(names) or 'nothing'}"
        )
    started = time.perf_counter()
    result = await slot.step(ref.sequence_id, position, inputs, time.monotonic())
    computed = call.compute_s = time.perf_counter() - started
    state[METRICS].observe_hop_compute("step", computed)
    if result.hidden is None:
        return Reply.json({"token": result.token, "logprob": result.logprob})
    if not route:
        raise BadRequest(f"segments {slot.first}-{slot.last} are not the last: a route is needed")
    payload, length = encode_request({slot.span.output_name: result.hidden})
    answer = await call_chain(_post(state), STEP, route, ref, deadline, payload, position, length)
    return Reply(answer)


async def steps(call: NodeCall) -> Reply:
    """The decode steps of several sequences of this chain (``STEPS``): each row runs in this
    span's next decode batch; the rows that go on are handed to the next span in one call."""
    state, headers = call.state, call.headers
    slot = _slot(state[DECODERS], headers)
    route, deadline = _route(headers)
    ids = [i for i in headers.get(rp.SEQUENCE_ID, "").split(",") if i]
    try:
        positions = [int(p) for p in headers.get(rp.POSITION, "").split(",")]
    except ValueError:
        raise BadRequest(f"grouped steps need {rp.POSITION}: a position per sequence") from None
    inputs, _ = _step_inputs(call, slot)
    if (
        not ids or len(positions) != len(ids) or inputs is None
        or inputs.ndim < 2 or inputs.shape[0] != len(ids) or inputs.shape[1] != 1
    ):  # fmt: skip
        raise BadRequest(
            f"grouped steps need one sequence id, one position and one row of "
            f"{slot.span.input_name} (one token each) per sequence; got {len(ids)} id(s), "
            f"{len(positions)} position(s) and {slot.span.input_name} of shape "
            f"{None if inputs is None else list(inputs.shape)}"
        )
    started = time.perf_counter()
    now = time.monotonic()
    rows = [slot.step(sid, p, inputs[k : k + 1], now)
            for k, (sid, p) in enumerate(zip(ids, positions, strict=True))]  # fmt: skip
    outcomes = await asyncio.gather(*rows, return_exceptions=True)
    computed = call.compute_s = time.perf_counter() - started
    state[METRICS].observe_hop_compute("step", computed)
    results: list[dict[str, Any]] = [{} for _ in ids]
    onward: list[tuple[int, np.ndarray]] = []
    for k, outcome in enumerate(outcomes):
        if isinstance(outcome, asyncio.CancelledError):  # its sequence was closed meanwhile
            results[k] = {"status": 410, "error": f"sequence {ids[k]!r} was closed while its "
                                                  "step waited"}  # fmt: skip
        elif isinstance(outcome, BaseException):
            results[k] = _row_error(outcome)
        elif outcome.hidden is None:
            results[k] = {"token": outcome.token, "logprob": outcome.logprob}
        elif not route:
            results[k] = {"status": 400, "error": f"segments {slot.first}-{slot.last} are not "
                                                  "the last: a route is needed"}  # fmt: skip
        else:
            onward.append((k, outcome.hidden))
    if onward:
        hidden = np.concatenate([h for _, h in onward], axis=0)
        payload, length = encode_request({slot.span.output_name: hidden})
        try:
            answers = await call_group(
                _post(state), route, headers.get(rp.MODEL, ""), slot.digest,
                [ids[k] for k, _ in onward], [positions[k] for k, _ in onward], deadline,
                payload, length, headers.get(rp.REQUEST_ID, "-"),
            )  # fmt: skip
        except (SequenceLost, UpstreamError) as exc:
            answers = [_row_error(exc)] * len(onward)
        for (k, _), answer in zip(onward, answers, strict=True):
            results[k] = answer
    return Reply.json({"results": results})


def _row_error(exc: BaseException) -> dict[str, Any]:
    """One row's failure, with the status its own call would have answered."""
    if isinstance(exc, UpstreamError):
        return {"status": exc.status, "error": str(exc)}
    status = status_of(exc) if isinstance(exc, Exception) else None
    return {"status": status or 500, "error": str(exc) or type(exc).__name__}


async def sequence_close(call: NodeCall) -> Reply:
    """Free the sequence here and on every later span; a node that is gone frees it by its
    TTL, so a failure downstream is logged, not raised."""
    state, headers = call.state, call.headers
    route, deadline = _route(headers)
    closed = False
    try:
        slot, ref = _held(state[DECODERS], headers)
        closed = slot.close(ref.sequence_id)
    except DigestMismatch:
        sequence_id = headers.get(rp.SEQUENCE_ID, "")
        ref = SequenceRef(headers.get(rp.MODEL, ""), headers.get(rp.DIGEST, ""),
                          sequence_id, headers.get(rp.REQUEST_ID, "-"))  # fmt: skip
    if route:
        try:
            await call_chain(_post(state), CLOSE, route, ref, deadline, b"{}")
        except Exception as exc:
            log.info("closing sequence %s downstream: %s", ref.sequence_id, exc)
    return Reply.json({"closed": closed})


# by path under /internal: answered over HTTP and, in the coordinator's process, as calls
CALLS: dict[str, Run] = {
    "/sequence/open": sequence_open,
    "/step": step,
    "/steps": steps,
    "/sequence/close": sequence_close,
}
INTERNAL_ROUTES = [web.post(path, http_route(run)) for path, run in CALLS.items()]


async def expire_forever(app: web.Application) -> AsyncIterator[None]:
    """Free the KV of sequences nobody steps any more (their coordinator or client is gone)."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(min(5.0, app[CONFIG].kv_idle_ttl_s / 4))
            app[DECODERS].expire()

    task = asyncio.get_running_loop().create_task(loop())
    yield
    task.cancel()


def slot_metadata(slot: DecoderSlot, name: str) -> dict[str, Any]:
    """A generation span's model metadata on its node (its part of the model, as a slot)."""
    span = slot.span
    return {
        "name": name,
        "versions": [slot.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": span.input_name, "datatype": "INT64" if span.is_first else "FP32",
                    "shape": [-1, -1] if span.is_first else [-1, -1, span.info.hidden_size]}],
        "outputs": [{"name": span.output_name, "datatype": "FP32",
                     "shape": [-1, span.info.vocab_size] if span.is_last
                     else [-1, -1, span.info.hidden_size]}],
        "parameters": {
            "digest": slot.digest,
            "device": span.device,
            "segments": slot.last - slot.first + 1,
            "sessions": span.session_count,
            "kind": "generation",
            "sequences": len(slot.sequences),
        },
    }  # fmt: skip


def slot_config(slot: DecoderSlot, name: str) -> dict[str, Any]:
    """Its configuration in Triton's shape: sequences, not batches, so max_batch_size 0."""
    meta = slot_metadata(slot, name)
    tensors = [
        {"name": t["name"], "data_type": f"TYPE_{t['datatype']}", "dims": t["shape"]}
        for t in (*meta["inputs"], *meta["outputs"])
    ]
    return {
        "name": name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": 0,
        "input": tensors[:1],
        "output": tensors[1:],
        "instance_group": [
            {"count": 1, "kind": "KIND_GPU" if slot.span.device == "cuda" else "KIND_CPU"}
        ],
        "parameters": {"digest": {"string_value": slot.digest}},
    }


def decoder_status(registry: DecoderRegistry) -> dict[str, Any]:
    """What heartbeats report of generation: KV bytes and sequences, per node."""
    stats = registry.stats()
    return {
        "kv_capacity_bytes": registry.budget.capacity_bytes,
        "kv_reserved_bytes": stats.reserved_bytes,
        "kv_used_bytes": stats.used_bytes,
        "sequences": stats.live_sequences + stats.idle_sequences,
        "tokens_computed": sum(s.tokens_computed for s in registry.slots.values()),
        "kv_cached_bytes": stats.cached_bytes,
        "sequences_queued": sum(len(s.waiting) for s in registry.slots.values()),
    }


def decoder_spans(registry: DecoderRegistry) -> list[dict[str, Any]]:
    """Each generation span's batching and prefix-cache figures (heartbeat ``load``): routing
    reads ``prefix_blocks``, the newest block names first (``runtime.prefix_cache``)."""
    keys = ("sequences_live", "sequences_queued", "prefill_tokens", "generated_tokens",
            "prefix_block_tokens", "prefix_blocks")  # fmt: skip
    out = []
    for slot in registry.slots.values():
        info = slot.info()
        out.append({"model": slot.name, "digest": slot.digest, "first": slot.first,
                    "last": slot.last, **{key: info[key] for key in keys}})  # fmt: skip
    return out
