"""The coordinator's service: the models it can place, their pinned placements, loading spans
onto nodes (they fetch segment files from here), and keeping every placement whole.

The version and placement a model serves change on an explicit load only (``switch``: the
whole pipeline at once, no failed request), or when a node has been gone past
``replace_after_s``, and survive a restart (``state``). REST handlers, the generation routes
and the job runner all call this one service; it never sees an HTTP request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from appliance.config import CoordinatorConfig
from appliance.coordinator import switch
from appliance.coordinator.async_jobs import JobRunner, RunJob
from appliance.coordinator.cluster import Cluster
from appliance.coordinator.entries import ModelEntry, open_entry
from appliance.coordinator.generation.step_groups import StepGroups
from appliance.coordinator.hop_batcher import HopBatcher
from appliance.coordinator.inference import InferencePath
from appliance.coordinator.links_view import links_view
from appliance.coordinator.metrics import CoordinatorMetrics
from appliance.coordinator.placement import Placement
from appliance.coordinator.request_policy import model_cache_policies
from appliance.coordinator.state import Pinned, restore_placements, save_placements
from appliance.coordinator.upkeep import Upkeep
from appliance.errors import BadRequest, NoLiveReplica
from appliance.http.errors import status_of
from appliance.ring.clients import InternalClients
from appliance.ring.hop_client import HopClient, HopSettings
from appliance.ring.links import LinkCollector
from appliance.ring.protocol import PeerUrl
from cache.job import Job
from cache.job_store import JobStore
from cache.result_cache import ResultCache
from runtime.errors import ModelNotFound, ModelNotReady
from runtime.package import list_repository
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
        self.models: dict[str, ModelEntry] = {}  # the version each placed model serves
        self.placements: dict[str, Placement] = {}
        self.retiring: dict[str, tuple[ModelEntry, Placement]] = {}  # by digest, draining
        self.loading: dict[str, ModelEntry] = {}  # model -> the version a load brings in
        self.loading_spans: set[tuple[str, str, int, int]] = set()  # node, digest, first, last
        self.in_flight: dict[str, int] = {}  # hops out, by digest
        self.live_sequences: dict[str, int] = {}  # generations under way, by digest
        self._catalog: dict[str, ModelEntry] = {}  # packages not placed, opened on demand
        self._locks: dict[str, asyncio.Lock] = {}
        self.metrics = m = CoordinatorMetrics()
        m.registry.register(LinkCollector(lambda: clients.links))
        if clients.local is not None:
            clients.local.observers.append(lambda url: m.in_process_calls.labels(url).inc())
        self.clients = clients
        self.session = clients.session
        self.hops = HopClient(
            clients.hop,
            HopSettings(min_attempt_s=config.min_attempt_s),
            on_attempt=lambda url: m.hop_attempts.labels(url).inc(),
            on_retry=lambda url: m.retries.labels(url).inc(),
            on_eject=lambda url: m.ejections.labels(url).inc(),
            on_success=lambda url, seconds: m.hop_latency.labels(url).observe(seconds),
            on_hedge=lambda url: m.hedges.labels(url).inc(),
        )
        self.cache = cache
        self.cache_policies, self.default_cache_policy = model_cache_policies(
            config.cache_models, config.cache_ttl_s
        )
        self.hop_batchers: dict[tuple[str, str], HopBatcher] = {}
        # decode steps of one chain, one call
        self.step_groups = StepGroups(
            clients.hop, lambda model, rows: m.step_rows.labels(model).observe(rows)
        )
        self.stats: dict[tuple[str, str], ModelStats] = {}  # by model and version
        self.texts: dict[str, PackageText] = {}  # tokenizers and chat templates, by digest
        self.sequences_on: dict[PeerUrl, int] = {}  # live sequences by node, a span each
        self.streams_by_client: dict[str, int] = {}  # open generation streams per client
        self.inference = InferencePath(self)
        # what each kind of job runs (the generation routes add theirs when the app is built)
        self.job_kinds: dict[str, RunJob] = {"infer": self.inference.run_job}
        self.jobs = JobRunner(
            job_store,
            self._run_job,
            config.job_workers,
            config.job_ttl_s,
            transient=lambda exc: status_of(exc) == 503,
            retry_window_s=max(config.request_timeout_s * 4, 60.0),
        )
        self.upkeep = Upkeep(self)
        self._tasks: list[asyncio.Task[None]] = []
        self._restore()

    def _restore(self) -> None:
        """The pinned versions and placements of the last run: served exactly, until a load."""
        migrated = False
        for name, pinned in restore_placements(self.state_dir).items():
            try:
                entry = open_entry(self.repo, name, pinned.version)
            except ModelNotFound as exc:
                log.error("%s was placed, but its package is gone: %s", name, exc)
                continue
            if pinned.digest is not None and pinned.digest != entry.digest:
                log.error(
                    "%s v%s on disk has digest %s, not the %s that was placed: not serving it "
                    "until it is loaded again", name, entry.version, entry.digest, pinned.digest,
                )  # fmt: skip
                continue
            migrated |= pinned.digest is None
            self.models[name], self.placements[name] = entry, pinned.placement
        if migrated:  # a format-1 file: pinned now, to the versions it served
            self.save_pinned()

    def save_pinned(self) -> None:
        save_placements(
            self.state_dir,
            {
                name: Pinned(self.models[name].package.version, self.models[name].digest, p)
                for name, p in self.placements.items()
                if name in self.models
            },
        )

    async def _run_job(self, job: Job) -> tuple[bytes, int | None]:
        run = self.job_kinds.get(job.kind)
        if run is None:
            kinds = ", ".join(sorted(self.job_kinds))
            raise BadRequest(f"job {job.id} is of kind {job.kind!r}; this coordinator runs {kinds}")
        return await run(job)

    def track(self, task: asyncio.Task[Any]) -> None:
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(task)

    def lock(self, name: str) -> asyncio.Lock:
        """Loads, unloads and replica changes of one model run one at a time."""
        return self._locks.setdefault(name, asyncio.Lock())

    async def start(self) -> None:
        await self.jobs.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self.upkeep.forever()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.jobs.close()
        await self.step_groups.close()

    # -- models ---------------------------------------------------------------------------

    def entry(self, name: str, version: str | None = None) -> ModelEntry:
        """The version a model serves (or, not placed, the highest on disk)."""
        entry = self.models.get(name) or self._catalog.get(name)
        if entry is None:
            entry = self._catalog[name] = open_entry(self.repo, name)
        if version is not None and version != entry.version:
            exported = ", ".join(map(str, list_repository(self.repo).get(name, [])))
            state = "serving" if name in self.models else "highest, not placed"
            raise ModelNotFound(
                f"model {name!r} has no version {version!r} serving; {state}: {entry.version} "
                f"(exported: {exported or 'none'}; POST /v2/repository/models/{name}/load with "
                f'{{"parameters": {{"version": "{version}"}}}} to serve it)'
            )
        return entry

    def version_states(self, name: str) -> list[dict[str, str]]:
        """Every exported version of a model with its state and reason, as Triton's
        repository index shows them: READY (serving), LOADING, UNLOADING (draining after a
        switch) or UNAVAILABLE (exported, not loaded)."""
        serving, loading = self.models.get(name), self.loading.get(name)
        retiring = {e.version for e, _ in self.retiring.values() if e.name == name}
        rows = []
        for number in list_repository(self.repo).get(name, []):
            version = str(number)
            if serving is not None and version == serving.version and name in self.placements:
                state, reason = "READY", ""
            elif loading is not None and version == loading.version:
                state, reason = "LOADING", "loading and warming every span replica"
            elif version in retiring:
                state, reason = "UNLOADING", "its requests in flight finish, then it is unloaded"
            elif serving is not None:
                state = "UNAVAILABLE"
                reason = f"exported, not loaded (v{serving.version} serves)"
            else:
                state, reason = "UNAVAILABLE", "exported, not loaded"
            rows.append({"name": name, "version": version, "state": state, "reason": reason})
        return rows

    def by_digest(self, name: str, digest: str) -> tuple[ModelEntry, Placement]:
        """The serving version if it has these bytes, else a retiring one still draining: what
        work begun on ``digest`` finishes on."""
        entry, placement = self.models.get(name), self.placements.get(name)
        if entry is not None and placement is not None and entry.digest == digest:
            return entry, placement
        if digest in self.retiring:
            return self.retiring[digest]
        raise ModelNotReady(f"model {name!r} version with digest {digest[:19]} is retired")

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

    def note_speeds(self) -> None:
        """The nodes' measured speeds, relative to the median node's, for the balancer."""
        speeds = {m.address: float(m.load.get("speed") or 0) for m in self.cluster.members.values()}
        known = sorted(v for v in speeds.values() if v > 0)
        median = known[len(known) // 2] if known else 0.0
        self.hops.speeds = {u: v / median if median and v > 0 else 1.0 for u, v in speeds.items()}

    # -- placement and loading ------------------------------------------------------------

    async def load(
        self,
        name: str,
        stages: int | None = None,
        replicas: int | None = None,
        version: int | None = None,
        allow_downtime: bool = False,
    ) -> Placement:
        """Serve ``version`` (default: the highest exported) of a model, placed anew: the
        whole pipeline switches at once once every new replica is warm (``switch``)."""
        async with self.lock(name):
            self._catalog.pop(name, None)  # re-read: a new version may have been exported
            return await switch.switch(self, name, stages, replicas, version, allow_downtime)

    async def unload(self, name: str) -> None:
        async with self.lock(name):
            entry = self.entry(name)
            if self.cache is not None:
                self.cache.drop_digest(entry.digest)
            self.models.pop(name, None)
            placement = self.placements.pop(name, None)
            self.save_pinned()
            if placement is not None:
                await switch.wait_drained(self, entry.digest)
            for member in self.cluster.live(time.monotonic()):
                for span in {(s.first, s.last) for s in member.spans if s.model == name}:
                    await switch.unload_span(self, member, name, span[0], span[1], None)

    # -- views ----------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if not self.placements:
            return False, "no model is placed on the ring"
        now = time.monotonic()
        for name, placement in self.placements.items():
            try:
                entry = self.entry(name)
                self.cluster.route(
                    name, entry.digest, len(entry.sizes), placement, now, silent_ok=False
                )
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
            "links": links_view(self.cluster.members.values(), self.clients.links),
            "models": {
                name: {
                    "serving_version": entry.version,
                    "serving_digest": entry.digest,
                    "loading_version": loading.version
                    if (loading := self.loading.get(name))
                    else None,
                    "loading_digest": loading.digest if loading else None,
                    "retiring_digests": [
                        d for d, (e, _) in self.retiring.items() if e.name == name
                    ],
                }
                for name, entry in self.models.items()
            },
        }
