"""A node's part in the ring: load spans on request (fetching segment files it lacks), run hops
and pass its outputs straight to the next span's node, and keep its membership alive."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

from appliance import ring_protocol as rp
from appliance.app_base import InternalClients, internal_clients
from appliance.app_keys import CONFIG, REGISTRY
from appliance.body import read_body
from appliance.config import NodeConfig
from appliance.errors import BadRequest, DigestMismatch
from appliance.hop_client import HopClient, HopSettings
from runtime.codec import decode_request, encode_request, encode_response, parse_header_length
from runtime.errors import DeadlineExceeded, ModelLoadError, ModelNotFound
from runtime.manifest import Manifest, read_manifest, segment_hash, write_manifest
from runtime.registry import LoadedModel, ModelRegistry
from runtime.signature import validate_inputs

log = logging.getLogger(__name__)

HOPS = web.AppKey("hop_client", HopClient)
IDENTITY = web.AppKey("identity", dict)
SESSION = web.AppKey("client_session", aiohttp.ClientSession)
CLIENTS = web.AppKey("internal_clients", InternalClients)
_FETCH_CHUNK = 1 << 20


def coordinator_url(join: str, tls: bool = False) -> str:
    if join.startswith(("http://", "https://")):
        return join
    return f"{'https' if tls else 'http'}://{join}"


def node_identity(config: NodeConfig) -> dict[str, Any]:
    """Stable id (config, else made once and kept in the state dir) and a fresh incarnation."""
    node_id = config.node_id
    if not node_id:
        state = Path(config.state_dir or Path(config.model_repo) / ".node")
        state.mkdir(parents=True, exist_ok=True)
        id_file = state / "node-id"
        if id_file.is_file():
            node_id = id_file.read_text().strip()
        else:
            node_id = "node-" + uuid.uuid4().hex[:8]
            id_file.write_text(node_id + "\n")
    budget = config.memory_budget or psutil.virtual_memory().available
    return {"node_id": node_id, "incarnation": uuid.uuid4().hex, "memory_budget": budget}


# --- hops ----------------------------------------------------------------------------------


def _held(registry: ModelRegistry, model: str, digest: str, first: int, last: int) -> LoadedModel:
    try:
        loaded = registry.get(rp.slot_name(model, first, last))
    except ModelNotFound:
        raise DigestMismatch(
            f"this node holds no span {first}-{last} of {model}; the route is stale"
        ) from None
    if loaded.digest != digest:
        raise DigestMismatch(
            f"this node holds {model} segments {first}-{last} with digest {loaded.digest}, "
            f"the hop asked for {digest}"
        )
    return loaded


async def hop(request: web.Request) -> web.Response:
    app = request.app
    model = request.headers.get(rp.MODEL, "")
    digest = request.headers.get(rp.DIGEST, "")
    first, last = rp.parse_span(request.headers.get(rp.SPAN))
    deadline = rp.parse_deadline(request.headers.get(rp.DEADLINE))
    route = rp.decode_route(request.headers.get(rp.ROUTE))
    request_id = request.headers.get(rp.REQUEST_ID, "-")
    loaded = _held(app[REGISTRY], model, digest, first, last)
    if rp.remaining(deadline) <= 0:
        raise DeadlineExceeded(f"request {request_id}: deadline passed before span {first}-{last}")
    body = await read_body(request, app[CONFIG].max_body_bytes)
    decoded = decode_request(
        body,
        parse_header_length(request.headers.get(rp.HEADER_LENGTH), len(body)),
        app[CONFIG].max_tensor_elements,
    )
    validate_inputs(loaded.signature, decoded.inputs)
    local_deadline = time.monotonic() + rp.remaining(deadline)
    outputs = await loaded.infer(decoded.inputs, None, local_deadline)
    if route:
        payload, length = encode_request(outputs)
        answer, answer_length = await app[HOPS].call(
            route, model, digest, request_id, deadline, payload, length
        )
    else:
        names = loaded.signature.output_names()
        answer, answer_length = encode_response(
            model, loaded.version, request_id, [(n, outputs[n]) for n in names], [True] * len(names)
        )
    response = web.Response(body=answer, content_type="application/octet-stream")
    if answer_length is not None:
        response.headers[rp.HEADER_LENGTH] = str(answer_length)
    return response


# --- loading spans -------------------------------------------------------------------------


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.json()
    except (json.JSONDecodeError, ValueError) as exc:
        raise BadRequest(f"body must be a JSON object: {exc}") from exc
    if not isinstance(raw, dict):
        raise BadRequest("body must be a JSON object")
    return raw


async def load_span(request: web.Request) -> web.Response:
    """Fetch what is missing of a span's segment files, check them, load and warm the span."""
    app = request.app
    raw = await _json_object(request)
    try:
        manifest = Manifest.from_dict(raw["manifest"], "load request")
        first, last = int(raw["first"]), int(raw["last"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"load needs manifest, first and last: {exc}") from exc
    repo = Path(app[CONFIG].model_repo)
    folder = repo / manifest.name / str(manifest.version)
    await _ensure_files(app, folder, manifest, first, last)
    loaded = await app[REGISTRY].load(
        manifest.name, manifest.version, (first, last), rp.slot_name(manifest.name, first, last)
    )
    if loaded.digest != manifest.digest:
        raise ModelLoadError(
            f"{folder} has digest {loaded.digest} but the coordinator sent {manifest.digest}"
        )
    return web.json_response(
        {
            "slot": rp.slot_name(manifest.name, first, last),
            "ready": True,
            "rss": psutil.Process().memory_info().rss,
        }
    )


async def unload_span(request: web.Request) -> web.Response:
    raw = await _json_object(request)
    try:
        slot = rp.slot_name(str(raw["model"]), int(raw["first"]), int(raw["last"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"unload needs model, first and last: {exc}") from exc
    await request.app[REGISTRY].unload(slot)
    return web.json_response({"slot": slot, "unloaded": True})


async def _ensure_files(
    app: web.Application, folder: Path, manifest: Manifest, first: int, last: int
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    source = coordinator_url(app[CONFIG].join, bool(app[CONFIG].tls_ca))
    for segment in manifest.segments[first : last + 1]:
        present = all((folder / f).is_file() for f in [segment.file, *segment.external_data])
        if present:
            actual = await asyncio.to_thread(
                segment_hash, folder, segment.file, segment.external_data
            )
            if actual == segment.sha256:
                continue
        if not app[CONFIG].join:
            raise ModelLoadError(
                f"{folder / segment.file} is missing and no coordinator to fetch it"
            )
        for name in [segment.file, *segment.external_data]:
            await _fetch(
                app[SESSION],
                f"{source}/internal/files/{manifest.name}/{manifest.version}/{name}",
                folder / name,
            )
        actual = await asyncio.to_thread(segment_hash, folder, segment.file, segment.external_data)
        if actual != segment.sha256:
            for name in [segment.file, *segment.external_data]:  # not kept to be trusted later
                (folder / name).unlink(missing_ok=True)
            raise ModelLoadError(
                f"fetched {segment.file} has sha256 {actual}, the manifest says {segment.sha256}"
            )
    if not (folder / "manifest.json").is_file() or read_manifest(folder).digest != manifest.digest:
        write_manifest(folder, manifest)


async def _fetch(session: aiohttp.ClientSession, url: str, target: Path) -> None:
    """Stream a file to a temp name, then rename: a torn download never looks complete."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as r:
            if r.status != 200:
                raise ModelLoadError(f"fetching {url} answered {r.status}: {await r.text()}")
            with open(tmp, "wb") as handle:
                async for chunk in r.content.iter_chunked(_FETCH_CHUNK):
                    handle.write(chunk)
                    digest.update(chunk)
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except aiohttp.ClientError as exc:
        raise ModelLoadError(f"fetching {url} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    log.info("fetched %s (%s)", target, digest.hexdigest()[:12])


# --- membership ----------------------------------------------------------------------------


def member_status(app: web.Application) -> dict[str, Any]:
    registry = app[REGISTRY]
    identity = app[IDENTITY]
    spans = []
    for loaded in registry.loaded():
        first, last = loaded.span
        spans.append(
            {
                "model": loaded.name,
                "version": loaded.version,
                "digest": loaded.digest,
                "first": first,
                "last": last,
                "ready": True,
            }
        )
    return {
        **identity,
        "device": next((m.runner.device for m in registry.loaded()), "cpu"),
        "spans": spans,
        "generation": registry.generation,
        "load": {
            "queue_depth": sum(m.batcher.queue_depth for m in registry.loaded()),
            "in_flight": sum(m.batcher.outstanding for m in registry.loaded()),
            "ewma_latency_s": max((m.stats.ewma_latency_s for m in registry.loaded()), default=0),
            "rss": psutil.Process().memory_info().rss,
        },
    }


async def identity(request: web.Request) -> web.Response:
    ident = request.app[IDENTITY]
    return web.json_response({"node_id": ident["node_id"], "incarnation": ident["incarnation"]})


async def keep_membership(app: web.Application) -> None:
    """Join, then heartbeat; join again whenever the coordinator no longer knows this node."""
    config = app[CONFIG]
    base = coordinator_url(config.join, bool(config.tls_ca))
    session = app[SESSION]
    joined = False
    backoff = 0.2
    while True:
        path = "/internal/heartbeat" if joined else "/internal/join"
        try:
            async with session.post(
                base + path, json=member_status(app), timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                if response.status == 200:
                    if not joined:
                        log.info("joined the ring at %s as %s", base, app[IDENTITY]["node_id"])
                    joined, backoff = True, 0.2
                elif response.status == 404:
                    joined = False  # the coordinator restarted or dropped us: join again
                    continue
                else:
                    log.warning(
                        "%s%s answered %s: %s", base, path, response.status, await response.text()
                    )
                    joined = False
        except (aiohttp.ClientError, TimeoutError) as exc:
            if joined:
                log.warning("coordinator %s unreachable: %s", base, exc)
            joined = False
        await asyncio.sleep(config.heartbeat_interval_s if joined else backoff)
        backoff = min(backoff * 2, 5.0)


def add_ring_routes(app: web.Application, config: NodeConfig) -> None:
    app[IDENTITY] = node_identity(config)
    app.add_routes(
        [
            web.post("/internal/hop", hop),
            web.post("/internal/load", load_span),
            web.post("/internal/unload", unload_span),
            web.get("/internal/identity", identity),
        ]
    )

    async def start(app: web.Application) -> None:
        app[CLIENTS] = internal_clients(config, app[IDENTITY]["node_id"])
        app[SESSION] = app[CLIENTS].session
        app[HOPS] = HopClient(app[CLIENTS].hop, HopSettings(min_attempt_s=config.min_attempt_s))

    async def stop(app: web.Application) -> None:
        await app[CLIENTS].close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)


def start_membership(app: web.Application, advertise_url: str) -> asyncio.Task[None]:
    app[IDENTITY]["address"] = advertise_url
    return asyncio.get_running_loop().create_task(keep_membership(app))
