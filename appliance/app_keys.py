"""Typed keys of the state an aiohttp app carries (shared by the node's and ring's handlers)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from appliance.config import NodeConfig
from appliance.metrics import Metrics
from runtime.registry import ModelRegistry

REGISTRY = web.AppKey("registry", ModelRegistry)
CONFIG = web.AppKey("config", NodeConfig)
METRICS = web.AppKey("metrics", Metrics)
LOADER = web.AppKey("loader", asyncio.Task)
