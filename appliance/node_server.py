"""The node's HTTP server: the KServe v2 / Open Inference Protocol over the models it holds.

Handlers parse, call the runtime, and serialise; errors are typed and mapped in http_errors.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from appliance.app_base import new_app
from appliance.app_keys import CONFIG, LOADER, METRICS, REGISTRY
from appliance.body import read_body
from appliance.config import NodeConfig
from appliance.errors import BadRequest
from appliance.http_errors import status_of
from appliance.logs import AccessLogger
from appliance.metrics import Metrics
from appliance.ring_node import add_ring_routes
from appliance.sd_notify import notify
from runtime.codec import decode_request, encode_response, parse_header_length
from runtime.errors import ModelNotFound, RuntimeFailure
from runtime.package import list_repository
from runtime.registry import ModelRegistry
from runtime.signature import validate_inputs, validate_output_names

log = logging.getLogger(__name__)


EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics", "model_configuration"]
HEADER_LENGTH = "Inference-Header-Content-Length"

try:
    SERVER_VERSION = version("onnx-appliance")
except PackageNotFoundError:  # running from a source tree
    SERVER_VERSION = "0.0.0+source"


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def _model_ref(request: web.Request) -> tuple[str, str | None]:
    return request.match_info["model"], request.match_info.get("version")


# --- server --------------------------------------------------------------------------------


async def server_metadata(request: web.Request) -> web.Response:
    return json_response(
        {"name": "onnx-appliance", "version": SERVER_VERSION, "extensions": EXTENSIONS}
    )


async def health_live(request: web.Request) -> web.Response:
    return json_response({"live": True})


async def health_ready(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    if registry.all_ready():
        return json_response({"ready": True})
    waiting = [row for row in registry.index() if row["state"] != "READY"]
    detail = ", ".join(f"{r['name']} {r['state']}" for r in waiting) or "no model loaded"
    response = json_response({"ready": False, "error": f"not ready: {detail}"}, status=503)
    response.headers["Retry-After"] = "1"
    return response


# --- models --------------------------------------------------------------------------------


async def model_metadata(request: web.Request) -> web.Response:
    name, version = _model_ref(request)
    return json_response(request.app[REGISTRY].get(name, version).metadata())


async def model_ready(request: web.Request) -> web.Response:
    name, version = _model_ref(request)
    model = request.app[REGISTRY].get(name, version)  # 404 unknown, 503 while loading
    return json_response({"name": model.name, "version": model.version, "ready": True})


async def model_config(request: web.Request) -> web.Response:
    name, version = _model_ref(request)
    return json_response(request.app[REGISTRY].get(name, version).config())


async def model_stats(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    if "model" in request.match_info:
        name, version = _model_ref(request)
        models = [registry.get(name, version)]
    else:
        models = registry.loaded()
    return json_response({"model_stats": [m.stats.as_dict(m.name, m.version) for m in models]})


def deadline_from(parameters: dict[str, Any]) -> float | None:
    """Triton's ``timeout`` request parameter, in microseconds, as an absolute deadline."""
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise BadRequest(
            f"parameter timeout must be a positive number of microseconds, got {timeout!r}"
        )
    return time.monotonic() + timeout / 1e6


async def infer(request: web.Request) -> web.Response:
    app = request.app
    name, version = _model_ref(request)
    started = time.perf_counter()
    status = 200
    try:
        response = await _infer(app, request, name, version)
        return response
    except Exception as exc:
        status = status_of(exc) or 500
        raise
    finally:
        metrics = app[METRICS]
        metrics.requests.labels(name, str(status)).inc()
        if status == 200:
            metrics.latency.labels(name).observe(time.perf_counter() - started)


async def _infer(
    app: web.Application, request: web.Request, name: str, version: str | None
) -> web.Response:
    model = app[REGISTRY].get(name, version)
    body = await read_body(request, app[CONFIG].max_body_bytes)
    header_length = parse_header_length(request.headers.get(HEADER_LENGTH), len(body))
    decoded = decode_request(body, header_length, app[CONFIG].max_tensor_elements)
    validate_inputs(model.signature, decoded.inputs)
    wanted = [o.name for o in decoded.outputs] if decoded.outputs else None
    if wanted:
        validate_output_names(model.signature, wanted)
    deadline = deadline_from(decoded.parameters)
    try:
        outputs = await model.infer(decoded.inputs, wanted, deadline)
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
    if response_header_length is None:
        response = web.Response(body=payload, content_type="application/json")
    else:
        response = web.Response(body=payload, content_type="application/octet-stream")
        response.headers[HEADER_LENGTH] = str(response_header_length)
    if should_compress(app[CONFIG].compress_responses, request, response_header_length, payload):
        response.enable_compression()
    return response


# JSON of numbers shrinks 2-4x under gzip; raw float tensors barely shrink and cost a core to
# compress, and many clients (aiohttp, httpx, requests) send Accept-Encoding by default.
_COMPRESS_MIN_BYTES = 4096


def should_compress(
    policy: str, request: web.Request, header_length: int | None, payload: bytes
) -> bool:
    return worth_compressing(
        policy,
        request.headers.get("Accept-Encoding", ""),
        request.remote,
        header_length,
        len(payload),
    )


def worth_compressing(
    policy: str, accepted: str, remote: str | None, header_length: int | None, size: int
) -> bool:
    """Whether to gzip/deflate an answer (a pure function of the request's facts).

    ``auto``: JSON answers of 4 KiB or more, to clients on another host. On the same host the
    bytes never meet a wire and compressing only spends CPU: MiniLM's JSON answers (75 KB)
    at concurrency 32 went from 640 to 279 per second with gzip on, measured.
    """
    if policy == "never" or ("gzip" not in accepted and "deflate" not in accepted):
        return False
    if policy == "always":
        return True
    return header_length is None and size >= _COMPRESS_MIN_BYTES and not _is_loopback(remote)


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:  # a Unix socket, or no address at all
        return False


# --- repository ----------------------------------------------------------------------------


async def optional_json_object(request: web.Request) -> dict[str, Any]:
    """Triton's client sends no body; others send {} or {"ready": true}."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body must be empty or a JSON object: {exc}") from exc
    if not isinstance(parsed, dict):
        raise BadRequest(f"body must be empty or a JSON object, got {type(parsed).__name__}")
    return parsed


async def repository_index(request: web.Request) -> web.Response:
    options = await optional_json_object(request)
    rows = request.app[REGISTRY].index()
    if options.get("ready") is True:
        rows = [row for row in rows if row["state"] == "READY"]
    return json_response(rows)


async def repository_load(request: web.Request) -> web.Response:
    await optional_json_object(request)
    name = request.match_info["model"]
    registry = request.app[REGISTRY]
    if name not in list_repository(registry.repo):
        raise ModelNotFound(
            f"no model {name!r} in repository {registry.repo}; it holds "
            f"{', '.join(list_repository(registry.repo)) or 'nothing'}"
        )
    await registry.load(name)
    return web.Response(status=200)


async def repository_unload(request: web.Request) -> web.Response:
    await optional_json_object(request)
    await request.app[REGISTRY].unload(request.match_info["model"])
    return web.Response(status=200)


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(),
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


def _loading_progress(message: str) -> None:
    """Loading a large span takes a while: say where it is, to systemd and on a terminal."""
    notify(f"STATUS={message}")
    if sys.stderr.isatty():
        print(f"\r{message:<100}", end="", file=sys.stderr, flush=True)
    log.debug("%s", message)


async def _load_models(app: web.Application) -> None:
    """Load and warm the configured models after the socket is open (live, not yet ready)."""
    config, registry = app[CONFIG], app[REGISTRY]
    # a ring member loads what the coordinator places on it; a lone node serves its repository
    names = config.models or ([] if config.join else sorted(list_repository(registry.repo)))
    if not names and not config.join:
        log.warning("model repository %s holds no model", registry.repo)
    for index, name in enumerate(names, 1):
        notify(f"STATUS=loading and warming {name} ({index}/{len(names)})")
        try:
            await registry.load(name)
        except RuntimeFailure as exc:
            log.error("model %s not loaded: %s", name, exc)
    ready = [m.name for m in registry.loaded()]
    notify(f"STATUS=serving {', '.join(ready) or 'nothing yet'}")
    notify("READY=1")  # only now: loaded and warmed


async def _start_loading(app: web.Application) -> None:
    app[LOADER] = asyncio.get_running_loop().create_task(_load_models(app))


async def _stop(app: web.Application) -> None:
    loader = app.get(LOADER)
    if loader is not None and not loader.done():
        loader.cancel()
    await app[REGISTRY].close()


def build_node_app(config: NodeConfig) -> web.Application:
    registry = ModelRegistry(
        Path(config.model_repo),
        config.session_settings(),
        config.batch_settings(),
        config.warmup_settings(),
        config.drain_timeout_s,
    )
    app = new_app(config)
    app[CONFIG] = config
    app[REGISTRY] = registry
    app[METRICS] = Metrics(registry.loaded)
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
    add_ring_routes(app, config)
    app.on_startup.append(_start_loading)
    app.on_shutdown.append(_stop)
    return app


async def start_app(
    app: web.Application,
    host: str,
    port: int,
    access_log: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0 = any free port); returns the runner and the bound port."""
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("appliance.access") if access_log else None,
        access_log_class=AccessLogger,
        handler_cancellation=True,  # a client that goes away cancels its queued work
        auto_decompress=False,  # body.py decodes, so the size limit holds after decompression
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, int(bound)
