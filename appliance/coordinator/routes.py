"""The coordinator's public routes: handlers parse the request, call the service, serialise."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from aiohttp import web
from prometheus_client import generate_latest

from appliance.coordinator.keys import coordinator_of
from appliance.coordinator.request_policy import parse_cache_control, wants_async
from appliance.errors import BadRequest
from appliance.http.body import read_body
from appliance.http.v2 import (
    HEADER_LENGTH,
    binary_or_json,
    json_response,
    model_ref,
    not_ready,
    read_json_object,
    should_compress,
)
from appliance.security.auth import caller_of
from cache.errors import JobNotFound
from runtime.batcher import BatchSettings
from runtime.codec import decode_response, encode_response, parse_header_length
from runtime.package import list_repository
from runtime.registry import triton_config

CACHE_HEADER = "X-Appliance-Cache"
STATUS_PAGE = Path(__file__).resolve().parent.parent / "static" / "status.html"


async def health_ready(request: web.Request) -> web.Response:
    ready, why = coordinator_of(request).ready()
    return json_response({"ready": True}) if ready else not_ready(why)


async def model_metadata(request: web.Request) -> web.Response:
    name, version = model_ref(request)
    coordinator = coordinator_of(request)
    answer = coordinator.entry(name, version).metadata()
    states = coordinator.version_states(name)
    answer["parameters"]["serving_version"] = next(
        (r["version"] for r in states if r["state"] == "READY"), None
    )
    answer["parameters"]["versions"] = [
        {k: r[k] for k in ("version", "state", "reason")} for r in states
    ]
    return json_response(answer)


async def model_ready(request: web.Request) -> web.Response:
    coordinator = coordinator_of(request)
    name, version = model_ref(request)
    entry, placement = coordinator.placed(name, version)
    coordinator.cluster.route(name, entry.digest, len(entry.sizes), placement, time.monotonic())
    return json_response({"name": name, "version": entry.version, "ready": True})


async def model_config(request: web.Request) -> web.Response:
    coordinator = coordinator_of(request)
    name, version = model_ref(request)
    entry = coordinator.entry(name, version)
    placement = coordinator.placements.get(name)
    config = coordinator.config
    # what a client may send in one request: the rows of one hop (the nodes batch further)
    batching = (
        BatchSettings(config.max_hop_batch_rows, 0, config.max_hop_queue)
        if entry.signature.batchable
        else None
    )
    answer = triton_config(name, entry.signature, entry.digest, batching)
    answer["placement"] = placement.as_dict() if placement else None
    return json_response(answer)


async def model_stats(request: web.Request) -> web.Response:
    """Triton's statistics extension: per model version, requests answered here (cache hits
    included), the time they queued for a hop and the time the ring took."""
    coordinator = coordinator_of(request)
    if "model" in request.match_info:
        name, version = model_ref(request)
        entry = coordinator.entry(name, version)
        keys = [(name, entry.version)]
    else:
        keys = sorted(coordinator.stats)
    return json_response(
        {"model_stats": [coordinator.model_stats(n, v).as_dict(n, v) for n, v in keys]}
    )


async def infer(request: web.Request) -> web.Response:
    name, _ = model_ref(request)
    metrics = coordinator_of(request).metrics
    return await metrics.requests.observe(name, lambda: _infer(request))


async def _infer(request: web.Request) -> web.Response:
    coordinator = coordinator_of(request)
    name, version = model_ref(request)
    coordinator.placed(name, version)  # 404 / 503 before reading the body
    body = await read_body(request, coordinator.config.max_body_bytes)
    length = parse_header_length(request.headers.get(HEADER_LENGTH), len(body))
    if wants_async(request.headers.get("Prefer")):
        job = await coordinator.inference.submit_job(
            name, version, body, length, caller_of(request).id
        )
        response = json_response(job.public(), status=202)
        response.headers["Location"] = f"/v2/jobs/{job.id}"
        response.headers["Preference-Applied"] = "respond-async"
        return response
    cache_control = parse_cache_control(request.headers.get("Cache-Control"))
    out, out_length, outcome = await coordinator.inference.infer_body(
        name, version, body, length, cache_control
    )
    response = binary_or_json(out, out_length)
    response.headers[CACHE_HEADER] = outcome
    if should_compress(coordinator.config.compress_responses, request, out_length, out):
        response.enable_compression()
    return response


async def repository_index(request: web.Request) -> web.Response:
    options = await read_json_object(request, optional=True)
    coordinator = coordinator_of(request)
    rows = [
        row
        for name in list_repository(coordinator.repo)
        for row in coordinator.version_states(name)
        if not options.get("ready") or row["state"] == "READY"
    ]
    return json_response(rows)


def _positive_parameter(parameters: dict[str, object], key: str) -> int | None:
    value = parameters.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise BadRequest(f"parameter {key} must be a positive integer, got {value!r}")
    return value


async def repository_load(request: web.Request) -> web.Response:
    options = await read_json_object(request, optional=True)
    parameters = options.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):  # not `or {}`: [], false or "" are mistakes, not defaults
        raise BadRequest(f"parameters must be a JSON object, got {type(parameters).__name__}")
    stages = _positive_parameter(parameters, "stages")
    replicas = _positive_parameter(parameters, "replicas")
    version = _version_parameter(parameters.get("version"))
    allow_downtime = parameters.get("allow_downtime", False)
    if not isinstance(allow_downtime, bool):
        raise BadRequest(f"parameter allow_downtime must be true or false, got {allow_downtime!r}")
    await coordinator_of(request).load(
        request.match_info["model"], stages, replicas, version, allow_downtime
    )
    return web.Response(status=200)


def _version_parameter(value: object) -> int | None:
    """A version as Triton's clients send it (a string, "1") or as a number; None: the
    highest exported."""
    if value is None:
        return None
    if isinstance(value, str) and value.isdecimal() and int(value) >= 1:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise BadRequest(f'parameter version must be a version number such as "2", got {value!r}')


async def repository_unload(request: web.Request) -> web.Response:
    await read_json_object(request, optional=True)
    await coordinator_of(request).unload(request.match_info["model"])
    return web.Response(status=200)


async def job_status(request: web.Request) -> web.Response:
    """The job; once succeeded, its result in the JSON form of a sync answer."""
    job = coordinator_of(request).jobs.get(request.match_info["job"], caller_of(request))
    view = job.public()
    if job.status == "succeeded" and job.result is not None and job.kind != "infer":
        view["result"] = orjson.loads(job.result)  # a generation route's JSON answer
    elif job.status == "succeeded" and job.result is not None:
        result = decode_response(job.result, job.result_header_length)
        payload, _ = encode_response(
            result.model_name,
            result.model_version,
            result.id,
            list(result.outputs.items()),
            [False] * len(result.outputs),
            result.parameters,
        )
        view["result"] = orjson.loads(payload)
    return json_response(view)


async def job_result(request: web.Request) -> web.Response:
    """The answer as the sync call would have sent it (binary outputs stay binary)."""
    job = coordinator_of(request).jobs.get(request.match_info["job"], caller_of(request))
    if job.status != "succeeded" or job.result is None:
        raise JobNotFound(f"job {job.id} has no result: it is {job.status}")
    return binary_or_json(job.result, job.result_header_length)


async def job_cancel(request: web.Request) -> web.Response:
    jobs = coordinator_of(request).jobs
    job = await jobs.cancel(request.match_info["job"], caller_of(request))
    return json_response(job.public())


async def status_page(request: web.Request) -> web.Response:
    """One self-contained page (no CDN) that draws the ring from /v2/cluster and /metrics."""
    return web.Response(body=STATUS_PAGE.read_bytes(), content_type="text/html")


async def cluster(request: web.Request) -> web.Response:
    return json_response(coordinator_of(request).cluster_view())


async def metrics(request: web.Request) -> web.Response:
    coordinator = coordinator_of(request)
    for status, count in coordinator.jobs.counts().items():
        coordinator.metrics.jobs.labels(status).set(count)
    if coordinator.cache is not None:
        stats = coordinator.cache.stats()
        for what in ("entries", "bytes_stored", "hits", "misses", "evictions", "admitted"):
            coordinator.metrics.cache_state.labels(what).set(getattr(stats, what))
        coordinator.metrics.cache_state.labels("degraded").set(1 if stats.degraded else 0)
    for member in coordinator.cluster.members.values():  # from the nodes' heartbeats
        for what in ("capacity", "reserved", "used"):
            value = member.load.get(f"kv_{what}_bytes")
            if isinstance(value, int | float):
                coordinator.metrics.kv_bytes.labels(member.node_id, what).set(value)
    return web.Response(
        body=generate_latest(coordinator.metrics.registry),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )
