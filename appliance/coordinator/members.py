"""The coordinator's internal routes: nodes join, heartbeat and leave, and fetch the segment
files of the spans placed on them."""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from appliance.coordinator.cluster import Member
from appliance.coordinator.entries import open_entry
from appliance.coordinator.keys import coordinator_of
from appliance.coordinator.service import Coordinator
from appliance.http.v2 import json_response, read_json_object
from appliance.security.signing import check_sender
from runtime.errors import ModelNotFound

log = logging.getLogger(__name__)


async def _member_body(request: web.Request) -> dict[str, Any]:
    """A join, heartbeat or leave body: a JSON object whose node id the signature names."""
    raw = await read_json_object(request)
    check_sender(request, raw.get("node_id"))
    return raw


async def join(request: web.Request) -> web.Response:
    coordinator = coordinator_of(request)
    raw = await _member_body(request)
    now = time.monotonic()
    old_alive = False
    existing = coordinator.cluster.members.get(str(raw.get("node_id")))
    if existing is not None and existing.incarnation != str(raw.get("incarnation")):
        old_alive = await _still_there(coordinator, existing)
    member = coordinator.cluster.join(raw, now, old_alive)
    coordinator.hops.ejected.pop(member.address, None)
    coordinator.note_speeds()
    log.info(
        "node %s joined from %s (%d spans held)", member.node_id, member.address, len(member.spans)
    )
    return json_response(
        {
            "node_id": member.node_id,
            "ring_index": member.ring_index,
            "assigned": coordinator.assigned_to(member.node_id),
            "peers": _peers(coordinator, member),
        }
    )


def _peers(coordinator: Coordinator, member: Member) -> list[str]:
    """The other live members, whose links the node times (appliance.ring.links); the
    coordinator times its own link to the node the same way."""
    coordinator.clients.prober.want([member.address])
    now = time.monotonic()
    return [m.address for m in coordinator.cluster.live(now) if m.node_id != member.node_id]


async def _still_there(coordinator: Coordinator, member: Member) -> bool:
    """Probe the previous incarnation: does its address still answer as that incarnation?"""
    try:
        async with coordinator.session.get(
            member.address + "/internal/identity", timeout=aiohttp.ClientTimeout(total=1)
        ) as response:
            body = await response.json()
            return bool(response.status == 200 and body.get("incarnation") == member.incarnation)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False


async def heartbeat(request: web.Request) -> web.Response:
    coordinator = coordinator_of(request)
    member = coordinator.cluster.heartbeat(await _member_body(request), time.monotonic())
    return json_response(
        {
            "node_id": member.node_id,
            "assigned": coordinator.assigned_to(member.node_id),
            "peers": _peers(coordinator, member),
        }
    )


async def leave(request: web.Request) -> web.Response:
    """A node stopping on purpose: out of routes at once, not after node_timeout_s."""
    coordinator = coordinator_of(request)
    raw = await _member_body(request)
    member = coordinator.cluster.members.get(str(raw.get("node_id")))
    if member is not None and member.incarnation == str(raw.get("incarnation")):
        coordinator.cluster.leave(member, time.monotonic())
        log.info("node %s left", member.node_id)
    return json_response({"left": member is not None})


async def segment_file(request: web.Request) -> web.StreamResponse:
    """A segment file of a package, for nodes that lack it (names checked against the manifest)."""
    coordinator = coordinator_of(request)
    name, version, file = (request.match_info[k] for k in ("model", "version", "file"))
    if not version.isdecimal():
        raise ModelNotFound(f"model {name} has no version {version!r}")
    entry = open_entry(coordinator.repo, name, int(version))  # any exported: a switch's too
    allowed = {f for s in entry.manifest.segments for f in [s.file, *s.external_data]}
    if file not in allowed:
        raise ModelNotFound(f"{file} is not a file of {name} version {version}")
    return web.FileResponse(entry.package.folder / file)


INTERNAL_ROUTES = [
    web.post("/join", join),
    web.post("/heartbeat", heartbeat),
    web.post("/leave", leave),
    web.get("/files/{model}/{version}/{file}", segment_file),
]
