"""The coordinator's aiohttp application: public routes, the ring's internal routes, and the
resources the service needs, each made and closed by one cleanup context."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from appliance.config import CoordinatorConfig
from appliance.coordinator import routes
from appliance.coordinator.generation.routes import ROUTES as GENERATION_ROUTES
from appliance.coordinator.generation.routes import generation_jobs
from appliance.coordinator.keys import COORDINATOR
from appliance.coordinator.members import INTERNAL_ROUTES
from appliance.coordinator.service import Coordinator
from appliance.http.app import new_app
from appliance.http.v2 import health_live, server_metadata
from appliance.ring.clients import internal_clients
from appliance.ring.local_peers import LocalPeers
from cache.job_store import JobStore
from cache.result_cache import CacheSettings, ResultCache

log = logging.getLogger(__name__)

COORDINATOR_SENDER = "coordinator"  # the sender id on the coordinator's signed calls


def _model_routes(prefix: str) -> list[web.RouteDef]:
    return [
        web.get(prefix, routes.model_metadata),
        web.get(prefix + "/ready", routes.model_ready),
        web.get(prefix + "/config", routes.model_config),
        web.get(prefix + "/stats", routes.model_stats),
        web.post(prefix + "/infer", routes.infer),
    ]


PUBLIC_ROUTES = [
    web.get("/", routes.status_page),
    web.get("/v2", server_metadata),
    web.get("/v2/health/live", health_live),
    web.get("/v2/health/ready", routes.health_ready),
    web.get("/v2/models/stats", routes.model_stats),
    *_model_routes("/v2/models/{model}"),
    *_model_routes("/v2/models/{model}/versions/{version}"),
    web.post("/v2/repository/index", routes.repository_index),
    web.post("/v2/repository/models/{model}/load", routes.repository_load),
    web.post("/v2/repository/models/{model}/unload", routes.repository_unload),
    web.get("/v2/cluster", routes.cluster),
    web.get("/v2/jobs/{job}", routes.job_status),
    web.get("/v2/jobs/{job}/result", routes.job_result),
    web.delete("/v2/jobs/{job}", routes.job_cancel),
    web.get("/metrics", routes.metrics),
    *(web.route(method, path, handler) for method, path, handler in GENERATION_ROUTES),
]


def _result_cache(config: CoordinatorConfig, state: Path) -> ResultCache | None:
    if not config.cache_enabled:
        return None
    cache = ResultCache(
        CacheSettings(
            path=Path(config.cache_dir or state / "cache"),
            max_bytes=config.cache_max_bytes,
            map_size=config.cache_map_size(),
            admit_after=config.cache_admit_after,
            ttl_s=config.cache_ttl_s or None,
        )
    )
    cache.start()
    if cache.degraded:
        log.warning("result cache disabled: %s", cache.reason)
    return cache


def build_coordinator_app(
    config: CoordinatorConfig, local: LocalPeers | None = None
) -> web.Application:
    """``local``: members sharing this process (``appliance serve --in-process-node``): calls to
    them are function calls, not loopback HTTP."""
    app = new_app(config, INTERNAL_ROUTES)
    app.add_routes(PUBLIC_ROUTES)

    async def coordinator(app: web.Application) -> AsyncIterator[None]:
        state = Path(config.state_dir or Path(config.model_repo) / ".coordinator")
        clients = internal_clients(config, COORDINATOR_SENDER, local)
        cache = _result_cache(config, state)
        store = JobStore(Path(config.jobs_dir or state / "jobs"), result_ttl_s=config.job_ttl_s)
        service = Coordinator(config, clients, cache, store)
        service.job_kinds.update(generation_jobs(service))
        app[COORDINATOR] = service
        await service.start()
        yield
        await service.close()
        if cache is not None:
            cache.close()
        await clients.close()

    app.cleanup_ctx.append(coordinator)
    return app
