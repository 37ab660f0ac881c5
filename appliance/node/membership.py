"""A node's membership of the ring: its identity, joining and heartbeating, leaving, and what
"ready" means for a ring node.

A ring node says READY=1 to systemd once it has joined and holds, loaded and warm, every span
the coordinator's placement assigns to it (the join and heartbeat answers list them); until
then STATUS= says what it is waiting for. A node assigned nothing is ready once joined.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

from appliance.config import NodeConfig
from appliance.http.v2 import json_response
from appliance.node.generation import decoder_spans, decoder_status
from appliance.node.keys import CLIENTS, CONFIG, DECODERS, IDENTITY, METRICS, REGISTRY, RESOURCES
from appliance.node.resources import NodeResources
from appliance.node.spans import coordinator_url
from appliance.sd_notify import notify
from runtime.decoder_registry import DecoderRegistry
from runtime.registry import ModelRegistry

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 4  # what this node speaks on /internal (2: generation; 3: relative
# deadlines; 4: grouped decode steps, ``appliance.ring.sequences.STEPS``)
PACKAGE_KINDS = ("single_pass", "generation")


def node_identity(config: NodeConfig, budget: int) -> dict[str, Any]:
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
    return {"node_id": node_id, "incarnation": uuid.uuid4().hex, "memory_budget": budget}


def member_status(state: Any) -> dict[str, Any]:
    """What a join or heartbeat reports: identity, spans held, load."""
    registry: ModelRegistry = state[REGISTRY]
    decoders: DecoderRegistry = state[DECODERS]
    held = [(m.name, m.version, m.digest, *m.span, m.package) for m in registry.loaded()]
    held += [(d.name, d.version, d.digest, d.first, d.last, d.package)
             for d in decoders.slots.values()]  # fmt: skip
    spans = [
        {"model": name, "version": version, "digest": digest, "first": first, "last": last,
         "ready": True, "bytes": sum(s.bytes for s in package.segments[first : last + 1])}
        for name, version, digest, first, last, package in held
    ]  # fmt: skip
    resources: NodeResources = state[RESOURCES]
    return {
        **state[IDENTITY],
        "protocol": PROTOCOL_VERSION,
        "kinds": list(PACKAGE_KINDS),
        "device": next((m.runner.device for m in registry.loaded()), resources.device),
        "spans": spans,
        "generation": registry.generation + decoders.generation,
        "load": {
            **decoder_status(decoders),
            "decoder_spans": decoder_spans(decoders),
            "queue_depth": sum(m.batcher.queue_depth for m in registry.loaded()),
            "in_flight": sum(m.batcher.outstanding for m in registry.loaded()),
            "ewma_latency_s": max((m.stats.ewma_latency_s for m in registry.loaded()), default=0),
            "rss": psutil.Process().memory_info().rss,
            "memory_available": resources.memory_available(),
            "speed": resources.speed_gflops,
            # its own span runs on hops and steps: beside the links' network seconds
            "hop_compute": {
                kind: {"seconds": round(total[0], 6), "count": int(total[1])}
                for kind, total in state[METRICS].hop_compute_totals.items()
            },
        },
        "links": state[CLIENTS].links.report() if CLIENTS in state else [],
    }


async def link_probe(request: web.Request) -> web.Response:
    """A peer timing its link to this node: the body is read (by the timing middleware) and
    only its size answered."""
    return json_response({"bytes": len(await request.read())})


async def identity(request: web.Request) -> web.Response:
    ident = request.config_dict[IDENTITY]
    return json_response({"node_id": ident["node_id"], "incarnation": ident["incarnation"]})


class _Readiness:
    """READY=1 once, when joined and every assigned span is held; STATUS= on each change."""

    def __init__(
        self, registry: ModelRegistry, decoders: DecoderRegistry, coordinator: str
    ) -> None:
        self.registry = registry
        self.decoders = decoders
        self.coordinator = coordinator
        self.ready_sent = False
        self._status = ""

    def update(self, joined: bool, assigned: list[dict[str, Any]]) -> None:
        held = {(m.name, m.digest, *m.span) for m in self.registry.loaded()}
        held |= {(d.name, d.digest, d.first, d.last) for d in self.decoders.slots.values()}
        waiting = [
            f"{a.get('model')} {a.get('first')}-{a.get('last')}"
            for a in assigned
            if (a.get("model"), a.get("digest"), a.get("first"), a.get("last")) not in held
        ]
        holding = ", ".join(f"{name} {first}-{last}" for name, _, first, last in sorted(held))
        if not joined:
            status = f"joining {self.coordinator}"
        elif waiting:
            status = f"joined {self.coordinator}; loading {', '.join(waiting)}"
        else:
            status = f"joined {self.coordinator}; holding {holding or 'no span yet'}"
        if status != self._status:
            self._status = status
            notify(f"STATUS={status}")
        if joined and not waiting and not self.ready_sent:
            self.ready_sent = True
            notify("READY=1")


class _FailureSeries:
    """One log line per series of failures with the same reason, and one when it ends, so a
    node that never joins says why at once, and a long outage does not flood the log."""

    def __init__(self) -> None:
        self.reason = ""
        self.count = 0

    def failed(self, reason: str) -> None:
        self.count += 1
        if reason != self.reason:
            self.reason = reason
            log.warning("%s (retrying; logged again only if the reason changes)", reason)

    def succeeded(self, what: str) -> None:
        if self.count:
            log.info("%s after %d failed attempt(s)", what, self.count)
        else:
            log.info("%s", what)
        self.reason, self.count = "", 0


async def keep_membership(app: web.Application) -> None:
    """Join, then heartbeat; join again whenever the coordinator no longer knows this node."""
    config = app[CONFIG]
    base = coordinator_url(config.join, bool(config.tls_ca))
    session = app[CLIENTS].session
    readiness = _Readiness(app[REGISTRY], app[DECODERS], base)
    failures = _FailureSeries()
    joined = False
    backoff = 0.2
    readiness.update(False, [])
    while True:
        path = "/internal/heartbeat" if joined else "/internal/join"
        try:
            async with session.post(
                base + path, json=member_status(app), timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                if response.status == 200:
                    answer = await response.json()
                    if not joined:
                        node_id = app[IDENTITY]["node_id"]
                        failures.succeeded(f"joined the ring at {base} as {node_id}")
                    joined, backoff = True, 0.2
                    assigned = answer.get("assigned", []) if isinstance(answer, dict) else []
                    _probe_peers(app, answer)
                    readiness.update(True, assigned if isinstance(assigned, list) else [])
                elif response.status == 404 and joined:
                    joined = False  # the coordinator restarted or dropped us: join again
                    continue
                else:
                    text = (await response.text())[:300]
                    failures.failed(f"{base}{path} answered {response.status}: {text}")
                    joined = False
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            what = "heartbeat to" if joined else "cannot join"
            failures.failed(f"{what} {base}: {type(exc).__name__}: {exc}")
            joined = False
        await asyncio.sleep(config.heartbeat_interval_s if joined else backoff)
        backoff = min(backoff * 2, 5.0)


def _probe_peers(app: web.Application, answer: Any) -> None:
    """Time the links to the other members the coordinator names (the first time each is
    seen, then every link_probe_interval_s), in the background."""
    peers = answer.get("peers") if isinstance(answer, dict) else None
    if isinstance(peers, list):
        own = app[IDENTITY].get("address")
        app[CLIENTS].prober.want(p for p in peers if isinstance(p, str) and p != own)


async def leave(app: web.Application) -> None:
    """Tell the coordinator this node is going, so routes skip it before its sockets close.
    Said only when the coordinator can hear it (``appliance serve`` stops nodes first)."""
    config = app[CONFIG]
    try:
        async with app[CLIENTS].session.post(
            coordinator_url(config.join, bool(config.tls_ca)) + "/internal/leave",
            json={"node_id": app[IDENTITY]["node_id"], "incarnation": app[IDENTITY]["incarnation"]},
            timeout=aiohttp.ClientTimeout(total=2),
        ):
            pass
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning(
            "could not tell the coordinator this node is leaving: %s", str(exc) or type(exc)
        )


def start_membership(app: web.Application, advertise_url: str) -> asyncio.Task[None]:
    app[IDENTITY]["address"] = advertise_url
    return asyncio.get_running_loop().create_task(keep_membership(app))
