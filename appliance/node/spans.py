"""Spans on a node: load one on the coordinator's request (fetching the segment files it lacks
from the coordinator, checking every hash), unload one."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web
from aiohttp.helpers import ChainMapProxy

from appliance.errors import BadRequest, DoesNotFit
from appliance.http.v2 import json_response, read_json_object
from appliance.node.keys import CLIENTS, CONFIG, DECODERS, IDENTITY, REGISTRY
from appliance.ring import protocol as rp
from runtime.decoder_slots import DecoderSlot
from runtime.errors import ModelLoadError
from runtime.manifest import Manifest, read_manifest, segment_hash, write_manifest
from runtime.memory import span_need
from runtime.registry import LoadedModel

log = logging.getLogger(__name__)

_FETCH_CHUNK = 1 << 20


def coordinator_url(join: str, tls: bool = False) -> str:
    if join.startswith(("http://", "https://")):
        return join
    return f"{'https' if tls else 'http'}://{join}"


async def load_span(request: web.Request) -> web.Response:
    """Fetch what is missing of a span's segment files, check them, load and warm the span."""
    state = request.config_dict
    raw = await read_json_object(request)
    try:
        manifest = Manifest.from_dict(raw["manifest"], "load request")
        first, last = int(raw["first"]), int(raw["last"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"load needs manifest, first and last: {exc}") from exc
    if not 0 <= first <= last < len(manifest.segments):
        raise BadRequest(f"span {first}-{last} is outside the {len(manifest.segments)} segments")
    slot = rp.slot_name(manifest.name, first, last, manifest.digest)
    if slot not in state[DECODERS].slots and not state[REGISTRY].is_ready(slot):
        check_budget(state, manifest, first, last)
    repo = Path(state[CONFIG].model_repo)
    folder = repo / manifest.name / str(manifest.version)
    await _ensure_files(state, folder, manifest, first, last)
    loaded: LoadedModel | DecoderSlot
    if manifest.is_generation:  # a decoder span: sequences with KV, not a batcher
        loaded = await state[DECODERS].load(manifest.name, manifest.version, first, last, slot)
    else:
        loaded = await state[REGISTRY].load(manifest.name, manifest.version, (first, last), slot)
    if loaded.digest != manifest.digest:
        raise ModelLoadError(
            f"{folder} has digest {loaded.digest} but the coordinator sent {manifest.digest}"
        )
    return json_response(
        {
            "slot": slot,
            "ready": True,
            "generation": state[REGISTRY].generation + state[DECODERS].generation,
            "rss": psutil.Process().memory_info().rss,
        }
    )


async def unload_span(request: web.Request) -> web.Response:
    """Unload one version of a span (``digest``), or every version of it without one."""
    raw = await read_json_object(request)
    try:
        model, first, last = str(raw["model"]), int(raw["first"]), int(raw["last"])
        digest = raw.get("digest")
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"unload needs model, first and last (and digest): {exc}") from exc
    state = request.config_dict
    if digest is not None:
        slots = [rp.slot_name(model, first, last, str(digest))]
    else:
        prefix = rp.slot_prefix(model, first, last)
        held = [*state[DECODERS].slots, *state[REGISTRY].names()]  # slot names, not models
        slots = [name for name in held if name.startswith(prefix)]
    unloaded = []
    for slot in slots:
        if slot in state[DECODERS].slots:
            state[DECODERS].unload(slot)  # the coordinator waited for its live sequences
            unloaded.append(slot)
        elif state[REGISTRY].is_ready(slot):
            await state[REGISTRY].unload(slot)  # queued requests finish (drain_timeout_s)
            unloaded.append(slot)
    generation = state[REGISTRY].generation + state[DECODERS].generation
    return json_response({"unloaded": unloaded, "generation": generation})


def check_budget(state: ChainMapProxy, manifest: Manifest, first: int, last: int) -> None:
    """A node never loads past its memory budget, whatever a (stale) coordinator asks: 507
    with the figures. Each span counts as placement counts it (1.15 x bytes + 150 MiB)."""
    budget = int(state[IDENTITY]["memory_budget"])
    need = span_need(sum(s.bytes for s in manifest.segments[first : last + 1]))
    held = held_need(state)
    if held + need > budget:
        raise DoesNotFit(
            f"this node's memory budget is {budget / 2**20:.0f} MiB; its spans take "
            f"{held / 2**20:.0f} MiB, and {manifest.name} segments {first}-{last} need "
            f"{need / 2**20:.0f} MiB more"
        )


def held_need(state: ChainMapProxy) -> int:
    """The memory the spans held take, counted as placement counts it."""
    spans = [
        sum(s.bytes for s in m.package.segments[m.span[0] : m.span[1] + 1])
        for m in state[REGISTRY].loaded()
    ]
    spans += [
        sum(s.bytes for s in d.package.segments[d.first : d.last + 1])
        for d in state[DECODERS].slots.values()
    ]
    return sum(span_need(b) for b in spans)


async def _ensure_files(
    state: ChainMapProxy, folder: Path, manifest: Manifest, first: int, last: int
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    source = coordinator_url(state[CONFIG].join, bool(state[CONFIG].tls_ca))
    for segment in manifest.segments[first : last + 1]:
        present = all((folder / f).is_file() for f in [segment.file, *segment.external_data])
        if present:
            actual = await asyncio.to_thread(
                segment_hash, folder, segment.file, segment.external_data
            )
            if actual == segment.sha256:
                continue
        if not state[CONFIG].join:
            raise ModelLoadError(
                f"{folder / segment.file} is missing and no coordinator to fetch it"
            )
        for name in [segment.file, *segment.external_data]:
            await _fetch(
                state[CLIENTS].session,
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
