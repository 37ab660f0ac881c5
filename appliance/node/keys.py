"""Typed keys of the state a node's aiohttp app carries (read with ``request.config_dict``)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from appliance.config import NodeConfig
from appliance.node.metrics import Metrics
from appliance.node.resources import NodeResources
from appliance.ring.clients import InternalClients
from appliance.ring.hop_client import HopClient
from runtime.decoder_registry import DecoderRegistry
from runtime.registry import ModelRegistry

REGISTRY = web.AppKey("registry", ModelRegistry)
DECODERS = web.AppKey("decoders", DecoderRegistry)  # the generation spans held
CONFIG = web.AppKey("config", NodeConfig)
METRICS = web.AppKey("metrics", Metrics)
LOADER = web.AppKey("loader", asyncio.Task)
IDENTITY = web.AppKey("identity", dict)  # node_id, incarnation, memory_budget, address
CLIENTS = web.AppKey("internal_clients", InternalClients)
HOPS = web.AppKey("hop_client", HopClient)
RESOURCES = web.AppKey("resources", NodeResources)  # device, speed, budget, memory free
