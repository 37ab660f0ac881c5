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

from appliance.errors import BadRequest
from appliance.http.v2 import json_response, read_json_object
from appliance.node.keys import CLIENTS, CONFIG, DECODERS, REGISTRY
from appliance.ring import protocol as rp
from runtime.decoder_slots import DecoderSlot
from runtime.errors import ModelLoadError
from runtime.manifest import Manifest, read_manifest, segment_hash, write_manifest
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
    repo = Path(state[CONFIG].model_repo)
    folder = repo / manifest.name / str(manifest.version)
    await _ensure_files(state, folder, manifest, first, last)
    slot = rp.slot_name(manifest.name, first, last)
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
            "slot": rp.slot_name(manifest.name, first, last),
            "ready": True,
            "generation": state[REGISTRY].generation + state[DECODERS].generation,
            "rss": psutil.Process().memory_info().rss,
        }
    )


async def unload_span(request: web.Request) -> web.Response:
    raw = await read_json_object(request)
    try:
        slot = rp.slot_name(str(raw["model"]), int(raw["first"]), int(raw["last"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"unload needs model, first and last: {exc}") from exc
    state = request.config_dict
    if slot in state[DECODERS].slots:
        state[DECODERS].unload(slot)  # its live sequences end: the coordinator moved them
    else:
        await state[REGISTRY].unload(slot)
    return json_response({"slot": slot, "unloaded": True})


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
