"""The coordinator: one KServe v2 endpoint for local apps in front of the ring of nodes.

It places models as spans on nodes (``placement.place``), tells nodes to load them (they fetch
segment files from here), routes each request to one replica of the first span with the route
of the others (one node call per request), fails over between replicas, and keeps the
placement pinned: it changes on an explicit load only, and survives a restart (state_dir).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from appliance.app_base import InternalClients, internal_clients, new_app
from appliance.async_jobs import JobRunner
from appliance.auth import (
    CALLER,
)
from appliance.body import read_body
from appliance.cluster import Cluster, HeldSpan, Member
from appliance.config import CoordinatorConfig
from appliance.errors import BadRequest, NoLiveReplica
from appliance.hop_batcher import HopBatcher
from appliance.hop_client import HopClient, HopSettings
from appliance.http_errors import status_of
from appliance.metrics import LATENCY_BUCKETS
from appliance.node_server import (
    HEADER_LENGTH,
    deadline_from,
    health_live,
    json_response,
    optional_json_object,
    server_metadata,
    should_compress,
)
from appliance.placement import (
    NodeCapacity,
    Placement,
    PlacementError,
    SpanAssignment,
    place,
)
from appliance.request_policy import (
    CacheControl,
    model_cache_policies,
    parse_cache_control,
    wants_async,
)
from appliance.signing import check_sender
from cache.errors import JobNotFound
from cache.job import Job
from cache.job_store import JobStore
from cache.keys import cache_key
from cache.result_cache import CacheSettings, ResultCache
from runtime.codec import (
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    parse_header_length,
)
from runtime.errors import DeadlineExceeded, ModelLoadError, ModelNotFound, ModelNotReady
from runtime.manifest import Manifest
from runtime.package import PackageRef, list_repository, open_package, plain_manifest
from runtime.signature import Signature, TensorSpec, validate_inputs, validate_output_names

log = logging.getLogger(__name__)
COORDINATOR_SENDER = "coordinator"  # the sender id on the coordinator's signed calls

CACHE_HEADER = "X-Appliance-Cache"
HOP_SAFE_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")  # request ids sent on as they are
DEFAULT_CACHE_CONTROL = CacheControl()


@dataclass
class ModelEntry:
    """A package the coordinator can place: its manifest, signature and segment sizes."""

    package: PackageRef
    manifest: Manifest
    signature: Signature

    @property
    def sizes(self) -> list[int]:
        return [s.bytes for s in self.manifest.segments]

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.package.name,
            "versions": [str(self.package.version)],
            "platform": "onnxruntime_onnx",
            "inputs": [s.as_dict() for s in self.signature.inputs],
            "outputs": [s.as_dict() for s in self.signature.outputs],
            "parameters": {"digest": self.package.digest, "segments": len(self.sizes)},
        }


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "appliance_requests",
            "inference requests by model and status",
            ["model", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "appliance_request_seconds",
            "end-to-end inference latency",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.hop_attempts = Counter(
            "appliance_hop_attempts", "calls to a first-span node", ["node"], registry=r
        )
        self.retries = Counter(
            "appliance_hop_retries", "hops retried on another replica", ["node"], registry=r
        )
        self.ejections = Counter(
            "appliance_ejections", "replicas ejected after a failure", ["node"], registry=r
        )
        self.members = Gauge(
            "appliance_ring_members", "ring members by health", ["health"], registry=r
        )
        self.cache = Counter(
            "appliance_cache_requests",
            "requests by cache outcome (hit, miss, bypass)",
            ["model", "outcome"],
            registry=r,
        )
        self.jobs = Gauge("appliance_jobs", "async jobs by status", ["status"], registry=r)
        self.cache_state = Gauge(
            "appliance_cache",
            "result cache: entries, bytes, hits, misses, evictions, degraded",
            ["what"],
            registry=r,
        )
        self.hop_rows = Histogram(
            "appliance_hop_rows",
            "rows per hop into the ring (more than one: requests batched together)",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.hop_latency = Histogram(
            "appliance_hop_seconds",
            "first hop to its answer (the rest of the chain included)",
            ["node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )


class Coordinator:
    """State and actions of the coordinator process; HTTP handlers call into it."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.repo = Path(config.model_repo)
        self.state_dir = Path(config.state_dir or self.repo / ".coordinator")
        self.cluster = Cluster(config.node_timeout_s)
        self.models: dict[str, ModelEntry] = {}
        self.placements: dict[str, Placement] = {}
        self.metrics = CoordinatorMetrics()
        self.session: aiohttp.ClientSession | None = None
        self.hops: HopClient | None = None
        self.clients: InternalClients | None = None
        self.hop_batchers: dict[tuple[str, str], HopBatcher] = {}
        self._loading: set[tuple[str, str, int, int]] = set()
        self._replacing: set[str] = set()
        self.cache_policies, self.default_cache_policy = model_cache_policies(
            config.cache_models, config.cache_ttl_s
        )
        self.cache: ResultCache | None = None
        self.jobs: JobRunner | None = None
        self._started = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []

    # -- models ---------------------------------------------------------------------------

    def entry(self, name: str, version: str | None = None) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            entry = self._open(name)
        if version is not None and version != str(entry.package.version):
            raise ModelNotFound(
                f"model {name!r} has no version {version!r} placed; placed: {entry.package.version}"
            )
        return entry

    def _open(self, name: str) -> ModelEntry:
        package = open_package(self.repo, name)
        manifest = package.manifest or plain_manifest(package)  # a plain model.onnx: 1 segment
        signature = Signature(
            inputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in manifest.inputs),
            outputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in manifest.outputs),
        )
        entry = ModelEntry(package, manifest, signature)
        self.models[name] = entry
        return entry

    def placed(self, name: str) -> tuple[ModelEntry, Placement]:
        entry = self.entry(name)
        placement = self.placements.get(name)
        if placement is None:
            raise ModelNotReady(
                f"model {name!r} is not placed on the ring; POST /v2/repository/models/{name}/load"
            )
        return entry, placement

    # -- placement and loading ------------------------------------------------------------

    async def load(self, name: str, stages: int | None, replicas: int | None) -> Placement:
        old = self.models.pop(name, None)  # re-read: a new version may have been exported
        entry = self.entry(name)
        if old is not None and old.package.digest != entry.package.digest and self.cache:
            self.cache.drop_digest(old.package.digest)  # unreachable already: free the space
        now = time.monotonic()
        live = self.cluster.live(now)
        sizes = {n: e.sizes for n, e in self.models.items()}
        capacities = [
            NodeCapacity(
                m.node_id,
                max(0, m.memory_budget - m.bytes_held_except(name, sizes)),
                1.0,
                m.ring_index,
            )
            for m in live
        ]
        if not capacities:
            raise NoLiveReplica(f"no node has joined the ring; cannot place {name}")
        previous = self.placements.get(name)
        try:
            placement = place(
                entry.sizes,
                capacities,
                replicas or self.config.replicas,
                stages or self.config.stages or None,
                version=(previous.version + 1) if previous else 1,
            )
        except PlacementError as exc:
            raise ModelNotReady(f"cannot place {name}: {exc}") from exc
        members = {m.node_id: m for m in live}
        jobs = [
            self._load_span(members[node], entry, span.first, span.last)
            for span in placement.spans
            for node in span.replicas
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*jobs), self.config.load_timeout_s)
        except TimeoutError:
            raise ModelNotReady(
                f"loading {name} took longer than {self.config.load_timeout_s}s; the placement "
                "was not changed"
            ) from None
        self.placements[name] = placement  # swap only once every replica is warm
        self._save_placements()
        await self._unload_outside(name, placement, live)
        log.info("placed %s: %s", name, placement.as_dict())
        return placement

    async def _load_span(self, member: Member, entry: ModelEntry, first: int, last: int) -> None:
        assert self.session is not None
        key = (member.node_id, entry.package.name, first, last)
        self._loading.add(key)
        try:
            payload = {"manifest": _manifest_dict(entry.manifest), "first": first, "last": last}
            async with self.session.post(
                member.address + "/internal/load",
                json=payload,
                timeout=aiohttp.ClientTimeout(total=self.config.load_timeout_s),
            ) as response:
                if response.status != 200:
                    why = (
                        f"node {member.node_id} could not load {entry.package.name} segments "
                        f"{first}-{last}: {response.status} {await response.text()}"
                    )
                    # a node refusing the files (400: a hash mismatch, a broken graph) is a
                    # permanent problem of the package, not a 503 to retry
                    raise ModelLoadError(why) if response.status == 400 else ModelNotReady(why)
                answer = await response.json()
        except aiohttp.ClientError as exc:
            raise ModelNotReady(f"node {member.node_id} unreachable while loading: {exc}") from exc
        finally:
            self._loading.discard(key)
        # count it as held now, before the next heartbeat says so (heartbeats replace the
        # member record: update the one that is current, if it is still that incarnation)
        current = self.cluster.members.get(member.node_id)
        if current is None or current.incarnation != member.incarnation:
            return
        name = entry.package.name
        current.spans = [
            s
            for s in current.spans
            if not (s.model == name and s.first == first and s.last == last)
        ]
        current.spans.append(
            HeldSpan(name, str(entry.package.version), entry.package.digest, first, last, True)
        )
        current.generation = max(current.generation, int(answer.get("generation", 0)))

    async def _unload_outside(self, name: str, placement: Placement, live: list[Member]) -> None:
        assert self.session is not None
        wanted = {(node, s.first, s.last) for s in placement.spans for node in s.replicas}
        for member in live:
            for span in list(member.spans):
                if span.model == name and (member.node_id, span.first, span.last) not in wanted:
                    try:
                        await self.session.post(
                            member.address + "/internal/unload",
                            json={"model": name, "first": span.first, "last": span.last},
                        )
                    except aiohttp.ClientError as exc:
                        log.warning("unload on %s failed: %s", member.node_id, exc)

    async def unload(self, name: str) -> None:
        entry = self.entry(name)
        if self.cache is not None:
            self.cache.drop_digest(entry.package.digest)
        self.placements.pop(name, None)
        self._save_placements()
        await self._unload_outside(name, Placement(0, ()), self.cluster.live(time.monotonic()))

    async def reconcile_forever(self) -> None:
        """Give every live node of a pinned placement the spans it should hold (a restarted
        node comes back empty; the placement itself does not move)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            self.metrics.members.labels("live").set(len(self.cluster.live(now)))
            self.metrics.members.labels("silent").set(
                len(self.cluster.members) - len(self.cluster.live(now))
            )
            for name, placement in list(self.placements.items()):
                try:
                    entry = self.entry(name)
                except ModelNotFound:
                    continue
                for span in placement.spans:
                    for node in span.replicas:
                        member = self.cluster.members.get(node)
                        key = (node, name, span.first, span.last)
                        if (
                            member is None
                            or not self.cluster.is_live(member, now)
                            or key in self._loading
                            or member.holds(name, entry.package.digest, span.first, span.last)
                        ):
                            continue
                        log.info(
                            "reloading %s segments %d-%d on %s", name, span.first, span.last, node
                        )
                        task = asyncio.get_running_loop().create_task(
                            self._reload(member, entry, span.first, span.last)
                        )
                        self._tasks.append(task)
            self._tasks = [t for t in self._tasks if not t.done()]
            await self._replace_lost_nodes(now)

    async def _replace_lost_nodes(self, now: float) -> None:
        """A node gone longer than replace_after_s gives its spans to live nodes: the model is
        placed again (the replicas still serving keep serving until the new ones are warm)."""
        grace = self.config.replace_after_s
        if grace <= 0:
            return
        for name, placement in list(self.placements.items()):
            lost = []
            for span in placement.spans:
                for node in span.replicas:
                    member = self.cluster.members.get(node)
                    seen = member.last_seen if member is not None else self._started
                    if now - seen > grace:
                        lost.append(node)
            if not lost or name in self._replacing:
                continue
            self._replacing.add(name)
            try:
                log.warning(
                    "nodes %s gone for over %.0fs: placing %s again", ", ".join(lost), grace, name
                )
                await self.load(name, len(placement.spans), len(placement.spans[0].replicas))
            except Exception as exc:  # retried on the next pass
                log.warning("placing %s again failed: %s", name, exc)
            finally:
                self._replacing.discard(name)

    async def _reload(self, member: Member, entry: ModelEntry, first: int, last: int) -> None:
        try:
            await self._load_span(member, entry, first, last)
        except (ModelNotReady, aiohttp.ClientError) as exc:
            log.warning("reload failed: %s", exc)

    def _save_placements(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / "placements.json.tmp"
        tmp.write_text(json.dumps({n: p.as_dict() for n, p in self.placements.items()}))
        tmp.replace(self.state_dir / "placements.json")

    def restore_placements(self) -> None:
        path = self.state_dir / "placements.json"
        if not path.is_file():
            return
        try:
            raw = json.loads(path.read_text())
            self.placements = {name: placement_from_dict(p) for name, p in raw.items()}
            log.info("restored placements of %s", ", ".join(self.placements) or "no model")
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ignoring unreadable %s: %s", path, exc)

    # -- requests -------------------------------------------------------------------------

    async def infer(self, request: web.Request, name: str, version: str | None) -> web.Response:
        self.placed(name)  # 404 / 503 before reading the body
        body = await read_body(request, self.config.max_body_bytes)
        length = parse_header_length(request.headers.get(HEADER_LENGTH), len(body))
        if wants_async(request.headers.get("Prefer")):
            return await self._submit_job(name, version, body, length, request.get(CALLER, ""))
        cache_control = parse_cache_control(request.headers.get("Cache-Control"))
        out, out_length, outcome = await self.infer_body(name, version, body, length, cache_control)
        response = web.Response(
            body=out,
            content_type="application/json" if out_length is None else "application/octet-stream",
        )
        response.headers[CACHE_HEADER] = outcome
        if out_length is not None:
            response.headers[HEADER_LENGTH] = str(out_length)
        if should_compress(self.config.compress_responses, request, out_length, out):
            response.enable_compression()
        return response

    async def infer_body(
        self,
        name: str,
        version: str | None,
        body: bytes,
        length: int | None,
        cache_control: CacheControl = DEFAULT_CACHE_CONTROL,
    ) -> tuple[bytes, int | None, str]:
        """One inference from a v2 body: the cache, else the ring. Returns the answer's body,
        its header length and the cache outcome (hit, miss or bypass)."""
        entry, placement = self.placed(name)
        if version is not None:
            self.entry(name, version)
        decoded = decode_request(body, length, self.config.max_tensor_elements)
        validate_inputs(entry.signature, decoded.inputs)
        wanted = [o.name for o in decoded.outputs] if decoded.outputs else None
        if wanted:
            validate_output_names(entry.signature, wanted)
        names = wanted or entry.signature.output_names()
        policy = self.cache_policies.get(name, self.default_cache_policy)
        use_cache = self.cache is not None and policy.enabled
        key = (
            cache_key(entry.package.digest, decoded.inputs, wanted)
            if use_cache and (cache_control.read or cache_control.write)
            else None
        )
        outputs = None
        if key is not None and cache_control.read and self.cache is not None:
            outputs = self.cache.get(key)
        outcome = "hit" if outputs is not None else ("miss" if key is not None else "bypass")
        self.metrics.cache.labels(name, outcome).inc()
        if outputs is None:
            timeout = deadline_from(decoded.parameters)
            # the id rides on hops as a header: one with control characters, spaces or
            # kilobytes of text would fail the hop (a 500), so such an id names only the answer
            safe = decoded.id and HOP_SAFE_ID.fullmatch(decoded.id)
            request_id = decoded.id if safe and decoded.id else uuid.uuid4().hex[:16]
            if self.config.hop_batching and timeout is None and entry.signature.batchable:
                answered = await self._batcher(name, entry, placement).infer(
                    decoded.inputs, request_id, time.monotonic() + self.config.request_timeout_s
                )
            else:
                answered = await self._hop(
                    name, entry, placement, decoded.inputs, request_id, timeout
                )
            outputs = {n: answered[n] for n in names}
            if key is not None and cache_control.write and self.cache is not None:
                self.cache.offer(key, outputs, policy.ttl_s)
        out, out_length = encode_response(
            name,
            str(entry.package.version),
            decoded.id,
            [(n, outputs[n]) for n in names],
            [decoded.wants_binary(n) for n in names],
            {"cache": "hit"} if outcome == "hit" else None,
        )
        return out, out_length, outcome

    async def _hop(
        self,
        name: str,
        entry: ModelEntry,
        placement: Placement,
        inputs: dict[str, np.ndarray],
        request_id: str,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """One hop into the ring with these inputs: every output of the model's last span.
        ``timeout``: the request's own deadline (monotonic), else request_timeout_s."""
        budget = (timeout - time.monotonic()) if timeout else self.config.request_timeout_s
        deadline = time.time() + budget
        route = self.cluster.route(
            name, entry.package.digest, len(entry.sizes), placement, time.monotonic()
        )
        payload, payload_length = encode_request(inputs)
        assert self.hops is not None
        try:
            answer, answer_length = await self.hops.call(
                route, name, entry.package.digest, request_id, deadline, payload, payload_length
            )
        except NoLiveReplica as exc:
            # the client's own timeout ran out, not the ring: 504, and not a 503 that
            # tells it (and the job runner) to retry a request that cannot make it
            if timeout is not None and time.time() >= deadline:
                raise DeadlineExceeded(
                    f"request {request_id}: its timeout passed before the ring answered"
                ) from exc
            raise
        self.metrics.hop_rows.labels(name).observe(next(iter(inputs.values())).shape[0])
        return decode_response(answer, answer_length).outputs

    def _batcher(self, name: str, entry: ModelEntry, placement: Placement) -> HopBatcher:
        """The model's hop batcher (a new one when the model's bytes change)."""
        key = (name, entry.package.digest)
        batcher = self.hop_batchers.get(key)
        if batcher is None:
            for old in [k for k in self.hop_batchers if k[0] == name]:
                del self.hop_batchers[old]  # its hops in flight finish on their own

            async def send(
                inputs: dict[str, np.ndarray], request_id: str, deadline: float
            ) -> dict[str, np.ndarray]:
                current, now_placed = self.placed(name)  # replicas may have moved meanwhile
                return await self._hop(name, current, now_placed, inputs, request_id, deadline)

            batcher = HopBatcher(
                send, self.config.max_hop_batch_rows, 1, self.config.max_hop_queue, name
            )
            self.hop_batchers[key] = batcher
        replicas = len(placement.spans[0].replicas) if placement.spans else 1
        batcher.max_in_flight = self.config.hops_in_flight_per_replica * max(1, replicas)
        return batcher

    async def _submit_job(
        self, name: str, version: str | None, body: bytes, length: int | None, owner: str
    ) -> web.Response:
        """Check the request as a sync call would, store it durably, then answer 202."""
        entry, _ = self.placed(name)
        if version is not None:
            self.entry(name, version)
        decoded = decode_request(body, length, self.config.max_tensor_elements)
        validate_inputs(entry.signature, decoded.inputs)
        if decoded.outputs:
            validate_output_names(entry.signature, [o.name for o in decoded.outputs])
        assert self.jobs is not None
        job = Job(uuid.uuid4().hex, name, version, "queued", time.time(), None, body, length, owner)
        await self.jobs.submit(job)
        response = json_response(job.public(), status=202)
        response.headers["Location"] = f"/v2/jobs/{job.id}"
        response.headers["Preference-Applied"] = "respond-async"
        return response

    async def run_job(self, job: Job) -> tuple[bytes, int | None]:
        out, out_length, _ = await self.infer_body(
            job.model, job.version, job.request, job.header_length
        )
        return out, out_length

    def ready(self) -> tuple[bool, str]:
        if not self.placements:
            return False, "no model is placed on the ring"
        now = time.monotonic()
        for name, placement in self.placements.items():
            try:
                entry = self.entry(name)
                self.cluster.route(name, entry.package.digest, len(entry.sizes), placement, now)
            except (NoLiveReplica, ModelNotFound) as exc:
                return False, str(exc)
        return True, ""

    def cluster_view(self) -> dict[str, Any]:
        now = time.monotonic()
        assert self.hops is not None
        return {
            "nodes": [
                m.as_dict(now, self.cluster.is_live(m, now), self.hops.is_ejected(m.address))
                for m in sorted(self.cluster.members.values(), key=lambda m: m.ring_index)
            ],
            "placements": {n: p.as_dict() for n, p in self.placements.items()},
            "models": {n: e.package.digest for n, e in self.models.items()},
        }


def placement_from_dict(raw: dict[str, Any]) -> Placement:
    """The inverse of ``Placement.as_dict`` (placements are kept across restarts)."""
    spans = tuple(
        SpanAssignment(
            int(s["span"]),
            int(s["first"]),
            int(s["last"]),
            int(s["bytes"]),
            tuple(str(r) for r in s["replicas"]),
        )
        for s in raw["spans"]
    )
    return Placement(int(raw["version"]), spans)


def _manifest_dict(manifest: Manifest) -> dict[str, Any]:
    return dict(json.loads(manifest.to_json()))


COORDINATOR = web.AppKey("coordinator", Coordinator)


def _c(request: web.Request) -> Coordinator:
    return request.app[COORDINATOR]


async def health_ready(request: web.Request) -> web.Response:
    ready, why = _c(request).ready()
    if ready:
        return json_response({"ready": True})
    response = json_response({"ready": False, "error": f"not ready: {why}"}, status=503)
    response.headers["Retry-After"] = "1"
    return response


async def model_metadata(request: web.Request) -> web.Response:
    return json_response(
        _c(request).entry(request.match_info["model"], request.match_info.get("version")).metadata()
    )


async def model_ready(request: web.Request) -> web.Response:
    coordinator = _c(request)
    name = request.match_info["model"]
    entry, placement = coordinator.placed(name)
    coordinator.entry(name, request.match_info.get("version"))
    coordinator.cluster.route(
        name, entry.package.digest, len(entry.sizes), placement, time.monotonic()
    )
    return json_response({"name": name, "version": str(entry.package.version), "ready": True})


async def model_config(request: web.Request) -> web.Response:
    coordinator = _c(request)
    name = request.match_info["model"]
    entry = coordinator.entry(name, request.match_info.get("version"))
    placement = coordinator.placements.get(name)
    return json_response(
        {
            "name": name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "input": [s.as_dict() for s in entry.signature.inputs],
            "output": [s.as_dict() for s in entry.signature.outputs],
            "parameters": {"digest": {"string_value": entry.package.digest}},
            "placement": placement.as_dict() if placement else None,
        }
    )


async def infer(request: web.Request) -> web.Response:
    coordinator = _c(request)
    name = request.match_info["model"]
    started = time.perf_counter()
    status = 200
    try:
        return await coordinator.infer(request, name, request.match_info.get("version"))
    except Exception as exc:
        status = status_of(exc) or 500
        raise
    finally:
        coordinator.metrics.requests.labels(name, str(status)).inc()
        if status == 200:
            coordinator.metrics.latency.labels(name).observe(time.perf_counter() - started)


async def repository_index(request: web.Request) -> web.Response:
    options = await optional_json_object(request)
    coordinator = _c(request)
    rows = []
    for name, versions in list_repository(coordinator.repo).items():
        for version in versions:
            placed = (
                name in coordinator.placements
                and coordinator.entry(name).package.version == version
            )
            row = {
                "name": name,
                "version": str(version),
                "state": "READY" if placed else "UNAVAILABLE",
                "reason": "" if placed else "not placed",
            }
            if not options.get("ready") or placed:
                rows.append(row)
    return json_response(rows)


async def repository_load(request: web.Request) -> web.Response:
    options = await optional_json_object(request)
    parameters = options.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):  # not `or {}`: [], false or "" are mistakes, not defaults
        raise BadRequest(f"parameters must be a JSON object, got {type(parameters).__name__}")
    stages, replicas = parameters.get("stages"), parameters.get("replicas")
    for key, value in (("stages", stages), ("replicas", replicas)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise BadRequest(f"parameter {key} must be a positive integer, got {value!r}")
    await _c(request).load(request.match_info["model"], stages, replicas)
    return web.Response(status=200)


async def repository_unload(request: web.Request) -> web.Response:
    await optional_json_object(request)
    await _c(request).unload(request.match_info["model"])
    return web.Response(status=200)


def _jobs(request: web.Request) -> JobRunner:
    jobs = _c(request).jobs
    assert jobs is not None
    return jobs


async def job_status(request: web.Request) -> web.Response:
    """The job; once succeeded, its result in the JSON form of a sync answer."""
    job = _jobs(request).get(request.match_info["job"], request.get(CALLER, ""))
    view = job.public()
    if job.status == "succeeded" and job.result is not None:
        result = decode_response(job.result, job.result_header_length)
        payload, _ = encode_response(
            result.model_name,
            result.model_version,
            result.id,
            list(result.outputs.items()),
            [False] * len(result.outputs),
            result.parameters,
        )
        view["result"] = orjson.loads(payload)
    return json_response(view)


async def job_result(request: web.Request) -> web.Response:
    """The answer as the sync call would have sent it (binary outputs stay binary)."""
    job = _jobs(request).get(request.match_info["job"], request.get(CALLER, ""))
    if job.status != "succeeded" or job.result is None:
        raise JobNotFound(f"job {job.id} has no result: it is {job.status}")
    response = web.Response(
        body=job.result,
        content_type="application/json"
        if job.result_header_length is None
        else "application/octet-stream",
    )
    if job.result_header_length is not None:
        response.headers[HEADER_LENGTH] = str(job.result_header_length)
    return response


async def job_cancel(request: web.Request) -> web.Response:
    job = await _jobs(request).cancel(request.match_info["job"], request.get(CALLER, ""))
    return json_response(job.public())


STATUS_PAGE = Path(__file__).resolve().parent / "static" / "status.html"


async def status_page(request: web.Request) -> web.Response:
    """One self-contained page (no CDN) that draws the ring from /v2/cluster and /metrics."""
    return web.Response(body=STATUS_PAGE.read_bytes(), content_type="text/html")


async def cluster(request: web.Request) -> web.Response:
    return json_response(_c(request).cluster_view())


async def metrics(request: web.Request) -> web.Response:
    coordinator = _c(request)
    if coordinator.jobs is not None:
        for status, count in coordinator.jobs.counts().items():
            coordinator.metrics.jobs.labels(status).set(count)
    if coordinator.cache is not None:
        stats = coordinator.cache.stats()
        for what in ("entries", "bytes_stored", "hits", "misses", "evictions", "admitted"):
            coordinator.metrics.cache_state.labels(what).set(getattr(stats, what))
        coordinator.metrics.cache_state.labels("degraded").set(1 if stats.degraded else 0)
    return web.Response(
        body=generate_latest(_c(request).metrics.registry),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


# --- internal ------------------------------------------------------------------------------


async def _body_json(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body must be JSON: {exc}") from exc


async def join(request: web.Request) -> web.Response:
    coordinator = _c(request)
    raw = await _body_json(request)
    check_sender(request, raw.get("node_id") if isinstance(raw, dict) else None)
    now = time.monotonic()
    old_alive = False
    existing = (
        coordinator.cluster.members.get(str(raw.get("node_id"))) if isinstance(raw, dict) else None
    )
    if existing is not None and existing.incarnation != str(raw.get("incarnation")):
        old_alive = await _still_there(coordinator, existing)
    member = coordinator.cluster.join(raw, now, old_alive)
    if coordinator.hops is not None:
        coordinator.hops.ejected.pop(member.address, None)
    log.info(
        "node %s joined from %s (%d spans held)", member.node_id, member.address, len(member.spans)
    )
    return json_response({"node_id": member.node_id, "ring_index": member.ring_index})


async def _still_there(coordinator: Coordinator, member: Member) -> bool:
    """Probe the previous incarnation: does its address still answer as that incarnation?"""
    assert coordinator.session is not None
    try:
        async with coordinator.session.get(
            member.address + "/internal/identity", timeout=aiohttp.ClientTimeout(total=1)
        ) as response:
            body = await response.json()
            return bool(response.status == 200 and body.get("incarnation") == member.incarnation)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False


async def heartbeat(request: web.Request) -> web.Response:
    coordinator = _c(request)
    raw = await _body_json(request)
    check_sender(request, raw.get("node_id") if isinstance(raw, dict) else None)
    member = coordinator.cluster.heartbeat(raw, time.monotonic())
    return json_response({"node_id": member.node_id})


async def leave(request: web.Request) -> web.Response:
    """A node stopping on purpose: out of routes at once, not after node_timeout_s."""
    coordinator = _c(request)
    raw = await _body_json(request)
    check_sender(request, raw.get("node_id") if isinstance(raw, dict) else None)
    member = (
        coordinator.cluster.members.get(str(raw.get("node_id"))) if isinstance(raw, dict) else None
    )
    if member is not None and member.incarnation == str(raw.get("incarnation")):
        member.last_seen = -1e9
        log.info("node %s left", member.node_id)
    return json_response({"left": member is not None})


async def segment_file(request: web.Request) -> web.StreamResponse:
    """A segment file of a package, for nodes that lack it (names checked against the manifest)."""
    coordinator = _c(request)
    name, version, file = (request.match_info[k] for k in ("model", "version", "file"))
    entry = coordinator.entry(name)
    if version != str(entry.package.version):
        raise ModelNotFound(f"model {name} version {version} is not in the repository")
    allowed = {f for s in entry.manifest.segments for f in [s.file, *s.external_data]}
    if file not in allowed:
        raise ModelNotFound(f"{file} is not a file of {name} version {version}")
    return web.FileResponse(entry.package.folder / file)


def _model_routes(prefix: str) -> list[web.RouteDef]:
    return [
        web.get(prefix, model_metadata),
        web.get(prefix + "/ready", model_ready),
        web.get(prefix + "/config", model_config),
        web.post(prefix + "/infer", infer),
    ]


def build_coordinator_app(config: CoordinatorConfig) -> web.Application:
    coordinator = Coordinator(config)
    app = new_app(config)
    app[COORDINATOR] = coordinator
    app.add_routes(
        [
            web.get("/", status_page),
            web.get("/v2", server_metadata),
            web.get("/v2/health/live", health_live),
            web.get("/v2/health/ready", health_ready),
            *_model_routes("/v2/models/{model}"),
            *_model_routes("/v2/models/{model}/versions/{version}"),
            web.post("/v2/repository/index", repository_index),
            web.post("/v2/repository/models/{model}/load", repository_load),
            web.post("/v2/repository/models/{model}/unload", repository_unload),
            web.get("/v2/cluster", cluster),
            web.get("/v2/jobs/{job}", job_status),
            web.get("/v2/jobs/{job}/result", job_result),
            web.delete("/v2/jobs/{job}", job_cancel),
            web.get("/metrics", metrics),
            web.post("/internal/join", join),
            web.post("/internal/heartbeat", heartbeat),
            web.post("/internal/leave", leave),
            web.get("/internal/files/{model}/{version}/{file}", segment_file),
        ]
    )

    async def start(app: web.Application) -> None:
        coordinator.clients = internal_clients(config, COORDINATOR_SENDER)
        coordinator.session = coordinator.clients.session
        m = coordinator.metrics
        coordinator.hops = HopClient(
            coordinator.clients.hop,
            HopSettings(min_attempt_s=config.min_attempt_s),
            on_attempt=lambda url: m.hop_attempts.labels(url).inc(),
            on_retry=lambda url: m.retries.labels(url).inc(),
            on_eject=lambda url: m.ejections.labels(url).inc(),
            on_success=lambda url, seconds: m.hop_latency.labels(url).observe(seconds),
        )
        coordinator.restore_placements()
        state = coordinator.state_dir
        if config.cache_enabled:
            coordinator.cache = ResultCache(
                CacheSettings(
                    path=Path(config.cache_dir or state / "cache"),
                    max_bytes=config.cache_max_bytes,
                    map_size=config.cache_map_size(),
                    admit_after=config.cache_admit_after,
                    ttl_s=config.cache_ttl_s or None,
                )
            )
            coordinator.cache.start()
            if coordinator.cache.degraded:
                log.warning("result cache disabled: %s", coordinator.cache.reason)
        coordinator.jobs = JobRunner(
            JobStore(Path(config.jobs_dir or state / "jobs"), result_ttl_s=config.job_ttl_s),
            coordinator.run_job,
            config.job_workers,
            config.job_ttl_s,
            transient=lambda exc: status_of(exc) == 503,
            retry_window_s=max(config.request_timeout_s * 4, 60.0),
        )
        await coordinator.jobs.start()
        coordinator._tasks.append(
            asyncio.get_running_loop().create_task(coordinator.reconcile_forever())
        )

    async def stop(app: web.Application) -> None:
        for task in coordinator._tasks:
            task.cancel()
        if coordinator.jobs is not None:
            await coordinator.jobs.close()
        if coordinator.cache is not None:
            coordinator.cache.close()
        if coordinator.clients is not None:
            await coordinator.clients.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app
