"""Typed keys of the coordinator app's state (read with ``request.config_dict``)."""

from __future__ import annotations

from aiohttp import web

from appliance.coordinator.service import Coordinator

COORDINATOR = web.AppKey("coordinator", Coordinator)


def coordinator_of(request: web.Request) -> Coordinator:
    return request.config_dict[COORDINATOR]
