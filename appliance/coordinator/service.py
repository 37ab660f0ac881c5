"""The coordinator's service: the models it can place, their pinned placements, loading spans
onto nodes (they fetch segment files from here), and keeping every placement whole.

The placement of a model changes on an explicit load only (or when a node has been gone past
``replace_after_s``), and survives a restart (``state``). REST handlers, the generation routes
and the job runner all call this one service; it never sees an HTTP request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp

from appliance.config import CoordinatorConfig
from appliance.coordinator.async_jobs import JobRunner
from appliance.coordinator.cluster import Cluster, HeldSpan, Member
from appliance.coordinator.entries import ModelEntry, open_entry
from appliance.coordinator.hop_batcher import HopBatcher
from appliance.coordinator.inference import InferencePath
from appliance.coordinator.metrics import CoordinatorMetrics
from appliance.coordinator.placement import NodeCapacity, Placement, place
from appliance.coordinator.request_policy import model_cache_policies
from appliance.coordinator.retry import Retry
from appliance.coordinator.state import restore_placements, save_placements
from appliance.errors import BadRequest, DoesNotFit, NoLiveReplica
from appliance.http.errors import status_of
from appliance.ring.clients import InternalClients
from appliance.ring.hop_client import HopClient, HopSettings
from appliance.ring.protocol import PeerUrl
from cache.job_store import JobStore
from cache.result_cache import ResultCache
from runtime.errors import ModelLoadError, ModelNotFound, ModelNotReady
from runtime.stats import ModelStats
from runtime.text import PackageText

log = logging.getLogger(__name__)


class Coordinator:
    """State and actions of the coordinator process; made inside the running loop with the
    resources it needs (clients to the ring, the result cache if enabled, the job store)."""

    def __init__(
        self,
        config: CoordinatorConfig,
        clients: InternalClients,
        cache: ResultCache | None,
        job_store: JobStore,
    ) -> None:
        self.config = config
        self.repo = Path(config.model_repo)
        self.state_dir = Path(config.state_dir or self.repo / ".coordinator")
        self.cluster = Cluster(config.node_timeout_s)
        self.models: dict[str, ModelEntry] = {}
        self.placements: dict[str, Placement] = restore_placements(self.state_dir)
        self.metrics = m = CoordinatorMetrics()
        self.clients = clients
        self.session = clients.session
        self.hops = HopClient(
            clients.hop,
            HopSettings(min_attempt_s=config.min_attempt_s),
            on_attempt=lambda url: m.hop_attempts.labels(url).inc(),
            on_retry=lambda url: m.retries.labels(url).inc(),
            on_eject=lambda url: m.ejections.labels(url).inc(),
            on_success=lambda url, seconds: m.hop_latency.labels(url).observe(seconds),
        )
        self.cache = cache
        self.cache_policies, self.default_cache_policy = model_cache_policies(
            config.cache_models, config.cache_ttl_s
        )
        self.hop_batchers: dict[tuple[str, str], HopBatcher] = {}
        self.stats: dict[tuple[str, str], ModelStats] = {}  # by model and version
        self.texts: dict[str, PackageText] = {}  # tokenizers and chat templates, by digest
        self.sequences_on: dict[PeerUrl, int] = {}  # live sequences by first-span node
        self.inference = InferencePath(self)
        self.jobs = JobRunner(
            job_store,
            self.inference.run_job,
            config.job_workers,
            config.job_ttl_s,
            transient=lambda exc: status_of(exc) == 503,
            retry_window_s=max(config.request_timeout_s * 4, 60.0),
        )
        self._loading: set[tuple[str, str, int, int]] = set()
        self._replacing: set[str] = set()
        self._replace_retry: dict[str, Retry] = {}
        self._started = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.jobs.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self.reconcile_forever()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.jobs.close()

    # -- models ---------------------------------------------------------------------------

    def entry(self, name: str, version: str | None = None) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            entry = self.models[name] = open_entry(self.repo, name)
        if version is not None and version != entry.version:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r} placed; placed: {entry.version}"
            )
        return entry

    def placed(self, name: str, version: str | None = None) -> tuple[ModelEntry, Placement]:
        entry = self.entry(name, version)
        placement = self.placements.get(name)
        if placement is None:
            raise ModelNotReady(
                f"model {name!r} is not placed on the ring; POST /v2/repository/models/{name}/load"
            )
        return entry, placement

    def text_of(self, entry: ModelEntry) -> PackageText:
        """The package's tokenizer and chat template (read once per digest)."""
        text = self.texts.get(entry.digest)
        if text is None:
            info = entry.manifest.generation
            if info is None:
                raise BadRequest(f"model {entry.name} is not a generation model")
            text = PackageText.open(
                entry.package.folder,
                info.tokenizer,
                info.chat_template,
                info.bos_token_id,
                info.eos_token_ids,
            )
            self.texts[entry.digest] = text
        return text

    def model_stats(self, name: str, version: str) -> ModelStats:
        return self.stats.setdefault((name, version), ModelStats())

    def assigned_to(self, node_id: str) -> list[dict[str, Any]]:
        """The spans the pinned placements give this node (a joining node waits for them
        before it tells systemd it is ready)."""
        out = []
        for name, placement in self.placements.items():
            try:
                digest = self.entry(name).digest
            except ModelNotFound:  # placed, then removed from the repository: nothing to hold
                continue
            for span in placement.spans:
                if node_id in span.replicas:
                    out.append({"model": name, "digest": digest, "first": span.first,
                                "last": span.last})  # fmt: skip
        return out

    # -- placement and loading ------------------------------------------------------------

    async def load(self, name: str, stages: int | None, replicas: int | None) -> Placement:
        old = self.models.pop(name, None)  # re-read: a new version may have been exported
        entry = self.entry(name)
        if old is not None and old.digest != entry.digest and self.cache:
            self.cache.drop_digest(old.digest)  # unreachable already: free the space
        live = self.cluster.live(time.monotonic())
        kind = entry.manifest.kind
        able = [m for m in live if kind in m.kinds]
        if live and not able:
            raise DoesNotFit(
                f"cannot place {name}: it is a {kind} package and none of the live nodes "
                f"({', '.join(m.node_id for m in live)}) serves that kind; upgrade them"
            )
        live = able
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
                stages or self.config.stages or len(entry.manifest.default_stages) or None,
                version=(previous.version + 1) if previous else 1,
            )
        except DoesNotFit as exc:
            raise DoesNotFit(f"cannot place {name}: {exc}") from exc
        members: dict[str, Member] = {m.node_id: m for m in live}
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
        save_placements(self.state_dir, self.placements)
        await self._unload_outside(name, placement, live)
        log.info("placed %s: %s", name, placement.as_dict())
        return placement

    async def _load_span(self, member: Member, entry: ModelEntry, first: int, last: int) -> None:
        key = (member.node_id, entry.name, first, last)
        self._loading.add(key)
        try:
            manifest = json.loads(entry.manifest.to_json())
            payload = {"manifest": manifest, "first": first, "last": last}
            async with self.session.post(
                member.address + "/internal/load",
                json=payload,
                timeout=aiohttp.ClientTimeout(total=self.config.load_timeout_s),
            ) as response:
                if response.status != 200:
                    why = (
                        f"node {member.node_id} could not load {entry.name} segments "
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
        current.spans = [
            s
            for s in current.spans
            if not (s.model == entry.name and s.first == first and s.last == last)
        ]
        current.spans.append(HeldSpan(entry.name, entry.version, entry.digest, first, last, True))
        current.generation = max(current.generation, int(answer.get("generation", 0)))

    async def _unload_outside(self, name: str, placement: Placement, live: list[Member]) -> None:
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
            self.cache.drop_digest(entry.digest)
        self.placements.pop(name, None)
        save_placements(self.state_dir, self.placements)
        await self._unload_outside(name, Placement(0, ()), self.cluster.live(time.monotonic()))

    # -- keeping placements whole ---------------------------------------------------------

    async def reconcile_forever(self) -> None:
        """Give every live node of a pinned placement the spans it should hold (a restarted
        node comes back empty; the placement itself does not move)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            live = self.cluster.live(now)
            self.metrics.members.labels("live").set(len(live))
            self.metrics.members.labels("silent").set(len(self.cluster.members) - len(live))
            for name, placement in list(self.placements.items()):
                try:
                    entry = self.entry(name)
                except ModelNotFound:
                    continue
                for span in placement.spans:
                    for node in span.replicas:
                        self._reload_if_missing(node, entry, span.first, span.last, now)
            self._tasks = [t for t in self._tasks if not t.done()]
            await self._replace_lost_nodes(now)

    def _reload_if_missing(
        self, node: str, entry: ModelEntry, first: int, last: int, now: float
    ) -> None:
        member = self.cluster.members.get(node)
        if (
            member is None
            or not self.cluster.is_live(member, now)
            or (node, entry.name, first, last) in self._loading
            or member.holds(entry.name, entry.digest, first, last)
        ):
            return
        log.info("reloading %s segments %d-%d on %s", entry.name, first, last, node)
        task = asyncio.get_running_loop().create_task(self._reload(member, entry, first, last))
        self._tasks.append(task)

    async def _replace_lost_nodes(self, now: float) -> None:
        """A node away longer than replace_after_s (since it was last seen or left; since
        this coordinator started for one never seen) gives its spans to live nodes: the model
        is placed again, the replicas still serving keep serving until the new ones are warm.
        A placement that fails is retried with a doubling backoff, logged once per series."""
        grace = self.config.replace_after_s
        if grace <= 0:
            return
        for name, placement in list(self.placements.items()):
            lost = [
                node
                for span in placement.spans
                for node in span.replicas
                if (since := self.cluster.gone_since(node, now, self._started)) is not None
                and now - since > grace
            ]
            retry = self._replace_retry.setdefault(name, Retry())
            if not lost:
                retry.reset()
                continue
            if name in self._replacing or now < retry.next_at:
                continue
            self._replacing.add(name)
            try:
                retry.say(
                    f"nodes {', '.join(lost)} gone for over {grace:.0f}s: placing {name} again"
                )
                await self.load(name, len(placement.spans), len(placement.spans[0].replicas))
                log.info("%s placed again after %d attempt(s)", name, retry.attempts + 1)
                retry.reset()
            except Exception as exc:  # retried after the backoff
                retry.failed(now, f"placing {name} again failed: {exc}")
            finally:
                self._replacing.discard(name)

    async def _reload(self, member: Member, entry: ModelEntry, first: int, last: int) -> None:
        try:
            await self._load_span(member, entry, first, last)
        except (ModelNotReady, ModelLoadError, aiohttp.ClientError) as exc:
            log.warning("reload failed: %s", exc)

    # -- views ----------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if not self.placements:
            return False, "no model is placed on the ring"
        now = time.monotonic()
        for name, placement in self.placements.items():
            try:
                entry = self.entry(name)
                self.cluster.route(name, entry.digest, len(entry.sizes), placement, now)
            except (NoLiveReplica, ModelNotFound) as exc:
                return False, str(exc)
        return True, ""

    def cluster_view(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "nodes": [
                m.as_dict(now, self.cluster.is_live(m, now), self.hops.is_ejected(m.address))
                for m in sorted(self.cluster.members.values(), key=lambda m: m.ring_index)
            ],
            "placements": {n: p.as_dict() for n, p in self.placements.items()},
            "models": {n: e.digest for n, e in self.models.items()},
        }
