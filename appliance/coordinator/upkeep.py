"""Keeping placements whole while the ring changes: a restarted node gets its spans again,
a node gone past ``replace_after_s`` has its spans placed elsewhere, and (``rebalance =
"replicas"``) a node that joins later becomes an extra replica of the busiest span."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import aiohttp

from appliance.coordinator import switch
from appliance.coordinator.cluster import Member
from appliance.coordinator.entries import ModelEntry
from appliance.coordinator.rebalance import SpanLoad, add_replica, busiest_span, node_busyness
from appliance.coordinator.retry import Retry
from appliance.errors import DoesNotFit
from runtime.errors import ModelLoadError, ModelNotFound, ModelNotReady

if TYPE_CHECKING:
    from appliance.coordinator.service import Coordinator

log = logging.getLogger(__name__)


class Upkeep:
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self._replacing: set[str] = set()
        self._rebalancing: set[str] = set()  # nodes getting an extra replica now
        self._replace_retry: dict[str, Retry] = {}
        self._started = time.monotonic()

    async def forever(self) -> None:
        """Give every live node of a pinned placement the spans it should hold (a restarted
        node comes back empty; the placement itself does not move)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            live = self.c.cluster.live(now)
            self.c.metrics.members.labels("live").set(len(live))
            self.c.metrics.members.labels("silent").set(len(self.c.cluster.members) - len(live))
            for name, placement in list(self.c.placements.items()):
                try:
                    entry = self.c.entry(name)
                except ModelNotFound:
                    continue
                for span in placement.spans:
                    for node in span.replicas:
                        self._reload_if_missing(node, entry, span.first, span.last, now)
            await self._replace_lost_nodes(now)
            if self.c.config.rebalance == "replicas":
                self._rebalance(live)

    def _rebalance(self, live: list[Member]) -> None:
        """A live node that holds nothing and is in no placement becomes an extra replica of
        the busiest span it has room for (loaded and warm before any route takes it)."""
        placed = {n for p in self.c.placements.values() for s in p.spans for n in s.replicas}
        for member in live:
            if member.spans or member.node_id in placed or member.node_id in self._rebalancing:
                continue
            spans = [
                SpanLoad(name, s.first, s.last, s.bytes, s.replicas)
                for name, p in self.c.placements.items()
                if name in self.c.models and self.c.models[name].manifest.kind in member.kinds
                for s in p.spans
            ]
            busyness: dict[str, float] = {m.node_id: node_busyness(m.load) for m in live}
            free = switch.capacities(self.c, [member])[0].memory_budget
            span = busiest_span(spans, busyness, member.node_id, free)
            if span is None:
                continue
            self._rebalancing.add(member.node_id)
            task = asyncio.get_running_loop().create_task(self._add_replica(member, span))
            self.c.track(task)

    async def _add_replica(self, member: Member, span: SpanLoad) -> None:
        try:
            async with self.c.lock(span.model):
                entry, placement = self.c.models.get(span.model), self.c.placements.get(span.model)
                if entry is None or placement is None:
                    return
                log.info(
                    "node %s joined with room: an extra replica of %s segments %d-%d",
                    member.node_id, span.model, span.first, span.last,
                )  # fmt: skip
                await switch.load_span(self.c, member, entry, span.first, span.last)
                self.c.placements[span.model] = add_replica(placement, span, member.node_id)
                self.c.save_pinned()
        except (ModelNotReady, ModelLoadError, DoesNotFit) as exc:
            log.warning("an extra replica on %s failed: %s", member.node_id, exc)
        finally:
            self._rebalancing.discard(member.node_id)

    def _reload_if_missing(
        self, node: str, entry: ModelEntry, first: int, last: int, now: float
    ) -> None:
        member = self.c.cluster.members.get(node)
        if (
            member is None
            or not self.c.cluster.is_live(member, now)
            or (node, entry.digest, first, last) in self.c.loading_spans
            or member.holds(entry.name, entry.digest, first, last)
        ):
            return
        log.info("reloading %s segments %d-%d on %s", entry.name, first, last, node)
        task = asyncio.get_running_loop().create_task(self._reload(member, entry, first, last))
        self.c.track(task)

    async def _replace_lost_nodes(self, now: float) -> None:
        """A node away longer than replace_after_s (since it was last seen or left; since
        this coordinator started for one never seen) gives its spans to live nodes: the model
        is placed again, the replicas still serving keep serving until the new ones are warm.
        A placement that fails is retried with a doubling backoff, logged once per series."""
        grace = self.c.config.replace_after_s
        if grace <= 0:
            return
        for name, placement in list(self.c.placements.items()):
            lost = [
                node
                for span in placement.spans
                for node in span.replicas
                if (since := self.c.cluster.gone_since(node, now, self._started)) is not None
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
                await self.c.load(name, len(placement.spans), len(placement.spans[0].replicas))
                log.info("%s placed again after %d attempt(s)", name, retry.attempts + 1)
                retry.reset()
            except Exception as exc:  # retried after the backoff
                retry.failed(now, f"placing {name} again failed: {exc}")
            finally:
                self._replacing.discard(name)

    async def _reload(self, member: Member, entry: ModelEntry, first: int, last: int) -> None:
        try:
            await switch.load_span(self.c, member, entry, first, last)
        except (ModelNotReady, ModelLoadError, DoesNotFit, aiohttp.ClientError) as exc:
            log.warning("reload failed: %s", exc)
