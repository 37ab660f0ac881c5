"""The node's HTTP server: the KServe v2 / Open Inference Protocol over the models it holds,
and the ring's internal routes (hops, span loads) when it is a ring member.

Handlers parse, call the runtime, and serialise; errors are typed and mapped in http/errors.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from appliance.config import NodeConfig
from appliance.http.app import INTERNAL_PREFIX, new_app
from appliance.http.body import read_body
from appliance.http.v2 import (
    HEADER_LENGTH,
    binary_or_json,
    deadline_from,
    health_live,
    json_response,
    model_ref,
    not_ready,
    read_json_object,
    server_metadata,
    should_compress,
)
from appliance.node import generation
from appliance.node.calls import Run, http_route, local_calls
from appliance.node.hops import hop
from appliance.node.keys import (
    CLIENTS,
    CONFIG,
    DECODERS,
    HOPS,
    IDENTITY,
    LOADER,
    METRICS,
    REGISTRY,
    RESOURCES,
)
from appliance.node.membership import identity, link_probe, node_identity
from appliance.node.metrics import Metrics
from appliance.node.resources import NodeResources, node_resources
from appliance.node.spans import load_span, unload_span
from appliance.ring.clients import internal_clients
from appliance.ring.hop_client import HopClient, HopSettings
from appliance.ring.local_peers import LocalPeers
from appliance.sd_notify import notify
from runtime.codec import decode_checked_request, encode_response, parse_header_length
from runtime.decoder_registry import DecoderRegistry
from runtime.errors import ModelNotFound, RuntimeFailure
from runtime.memory import span_need
from runtime.package import list_repository
from runtime.registry import ModelRegistry

log = logging.getLogger(__name__)


# --- health and models ---------------------------------------------------------------------


async def health_ready(request: web.Request) -> web.Response:
    registry = request.config_dict[REGISTRY]
    if registry.all_ready():
        return json_response({"ready": True})
    waiting = [row for row in registry.index() if row["state"] != "READY"]
    return not_ready(", ".join(f"{r['name']} {r['state']}" for r in waiting) or "no model loaded")


async def model_metadata(request: web.Request) -> web.Response:
    name, version = model_ref(request)
    slot = request.config_dict[DECODERS].slots.get(name)
    if slot is not None and version in (None, slot.version):  # a generation span held here
        return json_response(generation.slot_metadata(slot, name))
    return json_response(request.config_dict[REGISTRY].get(name, version).metadata())


async def model_ready(request: web.Request) -> web.Response:
    name, version = model_ref(request)
    model = request.config_dict[REGISTRY].get(name, version)  # 404 unknown, 503 while loading
    return json_response({"name": model.name, "version": model.version, "ready": True})


async def model_config(request: web.Request) -> web.Response:
    name, version = model_ref(request)
    slot = request.config_dict[DECODERS].slots.get(name)
    if slot is not None and version in (None, slot.version):
        return json_response(generation.slot_config(slot, name))
    return json_response(request.config_dict[REGISTRY].get(name, version).config())


async def model_stats(request: web.Request) -> web.Response:
    registry = request.config_dict[REGISTRY]
    if "model" in request.match_info:
        name, version = model_ref(request)
        models = [registry.get(name, version)]
    else:
        models = registry.loaded()
    return json_response({"model_stats": [m.stats.as_dict(m.name, m.version) for m in models]})


async def infer(request: web.Request) -> web.Response:
    name, _ = model_ref(request)
    return await request.config_dict[METRICS].requests.observe(name, lambda: _infer(request))


async def _infer(request: web.Request) -> web.Response:
    state = request.config_dict
    config = state[CONFIG]
    name, version = model_ref(request)
    model = state[REGISTRY].get(name, version)
    body = await read_body(request, config.max_body_bytes)
    header_length = parse_header_length(request.headers.get(HEADER_LENGTH), len(body))
    decoded = decode_checked_request(
        body, header_length, model.signature, config.max_tensor_elements
    )
    wanted = [o.name for o in decoded.outputs] if decoded.outputs else None
    try:
        outputs = await model.infer(decoded.inputs, wanted, deadline_from(decoded.parameters))
    except RuntimeFailure as exc:
        log.info("request %s to %s failed: %s", decoded.id or "-", name, exc)
        raise
    names = wanted or model.signature.output_names()
    payload, response_header_length = encode_response(
        model.name,
        model.version,
        decoded.id,
        [(n, outputs[n]) for n in names],
        [decoded.wants_binary(n) for n in names],
    )
    response = binary_or_json(payload, response_header_length)
    if should_compress(config.compress_responses, request, response_header_length, payload):
        response.enable_compression()
    return response


# --- repository ----------------------------------------------------------------------------


async def repository_index(request: web.Request) -> web.Response:
    options = await read_json_object(request, optional=True)
    rows = request.config_dict[REGISTRY].index()
    if options.get("ready") is True:
        rows = [row for row in rows if row["state"] == "READY"]
    return json_response(rows)


async def repository_load(request: web.Request) -> web.Response:
    await read_json_object(request, optional=True)
    name = request.match_info["model"]
    registry = request.config_dict[REGISTRY]
    if name not in list_repository(registry.repo):
        raise ModelNotFound(
            f"no model {name!r} in repository {registry.repo}; it holds "
            f"{', '.join(list_repository(registry.repo)) or 'nothing'}"
        )
    await registry.load(name)
    return web.Response(status=200)


async def repository_unload(request: web.Request) -> web.Response:
    await read_json_object(request, optional=True)
    await request.config_dict[REGISTRY].unload(request.match_info["model"])
    return web.Response(status=200)


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(
        body=request.config_dict[METRICS].render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


# --- app -----------------------------------------------------------------------------------


def _model_routes(prefix: str) -> list[web.RouteDef]:
    return [
        web.get(prefix, model_metadata),
        web.get(prefix + "/ready", model_ready),
        web.get(prefix + "/config", model_config),
        web.get(prefix + "/stats", model_stats),
        web.post(prefix + "/infer", infer),
    ]


# the ring's calls a caller in this process may make without HTTP (appliance.node.calls)
RING_CALLS: dict[str, Run] = {"/hop": hop, **generation.CALLS}

INTERNAL_ROUTES = [
    web.post("/hop", http_route(hop)),
    web.post("/load", load_span),
    web.post("/unload", unload_span),
    web.get("/identity", identity),
    web.post("/probe", link_probe),
    *generation.INTERNAL_ROUTES,
]


def _loading_progress(message: str) -> None:
    """Loading a large span takes a while: say where it is, to systemd and on a terminal."""
    notify(f"STATUS={message}")
    if sys.stderr.isatty():
        print(f"\r{message:<100}", end="", file=sys.stderr, flush=True)
    log.debug("%s", message)


async def _load_models(app: web.Application) -> None:
    """Load and warm the local models after the socket is open (live, not yet ready): a
    standalone node its repository's (or ``models``), then READY=1; a ring node only the
    ``models`` named, and it says READY once it holds what the coordinator placed on it
    (appliance.node.membership)."""
    config, registry = app[CONFIG], app[REGISTRY]
    names = config.models or ([] if config.join else sorted(list_repository(registry.repo)))
    if not names and not config.join:
        log.warning("model repository %s holds no model", registry.repo)
    for index, name in enumerate(names, 1):
        notify(f"STATUS=loading and warming {name} ({index}/{len(names)})")
        try:
            await registry.load(name)
        except RuntimeFailure as exc:
            log.error("model %s not loaded: %s", name, exc)
    if config.join:
        return
    ready = [m.name for m in registry.loaded()]
    notify(f"STATUS=serving {', '.join(ready) or 'nothing yet'}")
    notify("READY=1")  # only now: loaded and warmed


async def _local_models(app: web.Application) -> AsyncIterator[None]:
    app[LOADER] = asyncio.get_running_loop().create_task(_load_models(app))
    yield
    if not app[LOADER].done():
        app[LOADER].cancel()


def _ring_clients(local: LocalPeers | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def clients(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        app[CLIENTS] = internal_clients(config, app[IDENTITY]["node_id"], local)
        app[HOPS] = HopClient(app[CLIENTS].hop, HopSettings(min_attempt_s=config.min_attempt_s))
        yield
        await app[CLIENTS].close()

    return clients


def join_local_peers(app: web.Application, base_url: str, local: LocalPeers) -> None:
    """This node's ring calls, at ``base_url``, for the members of its process."""
    calls = {INTERNAL_PREFIX.rstrip("/") + path: run for path, run in RING_CALLS.items()}
    local.add(base_url, frozenset(calls), local_calls(app, calls))


async def _registry(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[REGISTRY].close()  # in-flight batches drain (bounded by drain_timeout_s)
    app[DECODERS].close()


def _kv_capacity(
    config: NodeConfig, registry: ModelRegistry, resources: NodeResources
) -> Callable[[list[Any]], int]:
    """What the memory budget leaves for KV once the spans held are paid for (each as
    placement counts it), or the configured kv_budget_bytes."""

    def capacity(slots: list[Any]) -> int:
        if config.kv_budget_bytes:
            return config.kv_budget_bytes
        budget = resources.budget
        held = [sum(s.bytes for s in m.package.segments[m.span[0] : m.span[1] + 1])
                for m in registry.loaded()]  # fmt: skip
        # a span with alone sessions holds its weights twice (runtime/decoder_load.py)
        held += [sum(s.bytes for s in d.package.segments[d.first : d.last + 1])
                 for d in slots for _ in range(d.span.session_sets)]  # fmt: skip
        return budget - sum(span_need(b) for b in held)

    return capacity


def build_node_app(config: NodeConfig, local: LocalPeers | None = None) -> web.Application:
    """``local``: the members sharing this process (``appliance serve --in-process-node``); the
    node's calls to them skip HTTP, and ``join_local_peers`` makes its own calls theirs."""
    registry = ModelRegistry(
        Path(config.model_repo),
        config.session_settings(),
        config.batch_settings(),
        config.warmup_settings(),
        config.drain_timeout_s,
    )
    resources = node_resources(config)
    app = new_app(config, INTERNAL_ROUTES)
    app[CONFIG] = config
    app[REGISTRY] = registry
    app[DECODERS] = DecoderRegistry(
        Path(config.model_repo),
        config.session_settings(),
        _kv_capacity(config, registry, resources),
        config.kv_idle_ttl_s,
        config.decoder_limits(),
    )
    app[METRICS] = Metrics(
        registry.loaded, app[DECODERS], lambda: app[CLIENTS].links if CLIENTS in app else None
    )
    app[RESOURCES] = resources
    app[IDENTITY] = node_identity(config, resources.budget)
    registry.observe = app[METRICS].observe_batch
    registry.progress = _loading_progress
    app.add_routes(
        [
            web.get("/v2", server_metadata),
            web.get("/v2/health/live", health_live),
            web.get("/v2/health/ready", health_ready),
            web.get("/v2/models/stats", model_stats),
            *_model_routes("/v2/models/{model}"),
            *_model_routes("/v2/models/{model}/versions/{version}"),
            web.post("/v2/repository/index", repository_index),
            web.post("/v2/repository/models/{model}/load", repository_load),
            web.post("/v2/repository/models/{model}/unload", repository_unload),
            web.get("/metrics", metrics_endpoint),
        ]
    )
    app.cleanup_ctx.append(_registry)
    app.cleanup_ctx.append(_ring_clients(local))
    app.cleanup_ctx.append(_local_models)
    app.cleanup_ctx.append(generation.expire_forever)
    return app
