"""Loading a model: a new version (or a new placement) switches the whole pipeline at once,
with no failed request.

1. Every span replica of the new version is loaded and warmed next to the old one (a node's
   slots are keyed by digest, so it holds v1 and v2 of a span side by side).
2. Once all are warm, the model's route flips to the new digest in one step (and is pinned on
   disk); requests from then on run on the new version, end to end.
3. Work in flight on the old digest finishes on it: the old slots are unloaded (and the old
   digest's cached results dropped) only once the coordinator has no hop or live sequence on
   it any more, or ``drain_timeout_s`` passed.
If a replica fails to load or warm, nothing flips: the new slots already loaded are unloaded,
the old version keeps serving, and the load answers with the node and the reason.

Where memory cannot hold both versions and every span has two replicas or more, the switch
rolls: one replica of every span leaves the old routes, the whole new chain is loaded there,
the route flips, then the remaining replicas are converted. Otherwise it is refused (507, with
what is short) unless the caller allows downtime.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import aiohttp

from appliance.coordinator.cluster import HeldSpan, Member
from appliance.coordinator.entries import ModelEntry, open_entry
from appliance.coordinator.links_view import link_figures
from appliance.coordinator.placement import NodeCapacity, Placement, SpanAssignment, place
from appliance.errors import DoesNotFit, NoLiveReplica
from runtime.errors import ModelLoadError, ModelNotReady
from runtime.memory import span_need

if TYPE_CHECKING:
    from appliance.coordinator.service import Coordinator

log = logging.getLogger(__name__)

Slot = tuple[str, str, int, int]  # node id, digest, first, last


def capacities(
    c: Coordinator, members: list[Member], free_digest: str | None = None
) -> list[NodeCapacity]:
    """What each node can still take: its budget less what its spans need (each as placement
    counts it), and never more than the memory it reports free now. Spans of ``free_digest``
    count as free (a new placement of the same bytes reuses them). Speeds are relative to the
    median node's, measured on the same calibration graph."""
    speeds = sorted(float(m.load.get("speed") or 0) for m in members)
    median = speeds[len(speeds) // 2] if speeds and speeds[len(speeds) // 2] > 0 else 0.0
    out = []
    for m in members:
        held = sum(span_need(s.bytes) for s in m.spans if s.digest != free_digest)
        free = m.memory_budget - held
        available = m.load.get("memory_available")
        if isinstance(available, int | float) and available > 0:
            free = min(free, int(available))
        speed = float(m.load.get("speed") or 0)
        throughput = speed / median if median and speed > 0 else 1.0
        # in quarters: a calibration differs by 10-15 % between runs on one busy machine, and
        # such noise must not reorder a placement (equal machines keep the ring order)
        throughput = max(0.25, round(throughput * 4) / 4)
        out.append(NodeCapacity(m.node_id, max(0, free), throughput, m.ring_index))
    return out


def link_terms(c: Coordinator, entry: ModelEntry) -> dict[str, Any]:
    """What placement weighs cuts on links with: the links measured so far, and the bytes
    per row each segment hands the next and the model's input (from its manifest)."""
    manifest = entry.manifest
    return {
        "links": link_figures(c.cluster.members.values(), c.clients.links),
        "frontier_bytes": [s.output_row_bytes for s in manifest.segments],
        "input_bytes": sum(t.row_bytes() for t in manifest.inputs) if manifest.inputs else None,
    }


async def load_span(
    c: Coordinator, member: Member, entry: ModelEntry, first: int, last: int
) -> None:
    key = (member.node_id, entry.digest, first, last)
    c.loading_spans.add(key)
    try:
        payload = {"manifest": json.loads(entry.manifest.to_json()), "first": first, "last": last}
        async with c.session.post(
            member.address + "/internal/load",
            json=payload,
            timeout=aiohttp.ClientTimeout(total=c.config.load_timeout_s),
        ) as response:
            if response.status != 200:
                why = (
                    f"node {member.node_id} could not load {entry.name} v{entry.version} "
                    f"segments {first}-{last}: {response.status} {await response.text()}"
                )
                # a node refusing the files (400: a hash mismatch, a broken graph) is a
                # problem of the package, its budget (507) one of memory: neither a retry
                if response.status == 400:
                    raise ModelLoadError(why)
                raise DoesNotFit(why) if response.status == 507 else ModelNotReady(why)
            answer = await response.json()
    except aiohttp.ClientError as exc:
        raise ModelNotReady(f"node {member.node_id} unreachable while loading: {exc}") from exc
    finally:
        c.loading_spans.discard(key)
    # count it as held now, before the next heartbeat says so (heartbeats replace the
    # member record: update the one that is current, if it is still that incarnation)
    current = c.cluster.members.get(member.node_id)
    if current is None or current.incarnation != member.incarnation:
        return
    nbytes = sum(entry.sizes[first : last + 1])
    held = HeldSpan(entry.name, entry.version, entry.digest, first, last, True, nbytes)
    current.spans = [s for s in current.spans if s.key != held.key] + [held]
    current.generation = max(current.generation, int(answer.get("generation", 0)))


async def unload_span(
    c: Coordinator, member: Member, model: str, first: int, last: int, digest: str | None
) -> None:
    body: dict[str, Any] = {"model": model, "first": first, "last": last}
    if digest is not None:
        body["digest"] = digest

    def goes(s: HeldSpan) -> bool:
        return (s.model == model and s.first == first and s.last == last
                and (digest is None or s.digest == digest))  # fmt: skip

    # out of routes first: hops sent meanwhile would meet a slot going away (409, retried)
    member.spans = [s for s in member.spans if not goes(s)]
    try:
        async with c.session.post(member.address + "/internal/unload", json=body) as response:
            answer = await response.json() if response.status == 200 else {}
    except (aiohttp.ClientError, ValueError) as exc:
        log.warning("unload on %s failed: %s", member.node_id, exc)
        return
    # a heartbeat built before this unload may have replaced the record meanwhile and brought
    # the span back (a rolling switch then saw no room for the new chain): drop it from the
    # record that is current, and keep its generation so that no older heartbeat restores it
    current = c.cluster.members.get(member.node_id)
    if current is None or current.incarnation != member.incarnation:
        return
    current.spans = [s for s in current.spans if not goes(s)]
    current.generation = max(current.generation, int(answer.get("generation", 0)))


@contextmanager
def counting(counter: dict[str, int], digest: str) -> Iterator[None]:
    """Count work on ``digest`` while it runs (``wait_drained`` waits for 0)."""
    counter[digest] = counter.get(digest, 0) + 1
    try:
        yield
    finally:
        counter[digest] -= 1
        if not counter[digest]:
            del counter[digest]


def choose_stages(
    asked: int | None, exported: int, configured: int, current: int, segments: int
) -> int | None:
    """The spans a load places (None: the fewest that fit): the load's own, else what the
    package was exported for, else the coordinator's ``stages``, else the model's current
    count (a plain reload keeps its shape). Only the load's own may exceed the segments (and
    is refused for it); the others are cut to them, as a one-segment model takes one span."""
    if asked:
        return asked
    exported = exported if exported > 1 else 0  # an export without --stages records one
    for wanted in (exported, configured, current):
        if wanted:
            if wanted > segments:
                log.info("%d span(s) asked for a model of %d segment(s): placing %d",
                         wanted, segments, segments)  # fmt: skip
            return min(wanted, segments)
    return None


def slots(entry: ModelEntry, placement: Placement) -> set[Slot]:
    return {(n, entry.digest, s.first, s.last) for s in placement.spans for n in s.replicas}


async def load_all(c: Coordinator, entry: ModelEntry, placement: Placement) -> None:
    """Load every replica of ``placement`` not held yet; on any failure unload what this call
    loaded and raise the first failure (it names the node and the reason)."""
    members: dict[str, Member] = dict(c.cluster.members)
    wanted = [
        (members[node], s.first, s.last)
        for s in placement.spans
        for node in s.replicas
        if node in members and not members[node].holds(entry.name, entry.digest, s.first, s.last)
    ]
    jobs = [load_span(c, m, entry, first, last) for m, first, last in wanted]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*jobs, return_exceptions=True), c.config.load_timeout_s
        )
    except TimeoutError:
        results = [ModelNotReady(f"loading {entry.name} took longer than "
                                 f"{c.config.load_timeout_s}s")] * len(wanted)  # fmt: skip
    failures = [r for r in results if isinstance(r, BaseException)]
    if not failures:
        return
    for (member, first, last), result in zip(wanted, results, strict=True):
        if not isinstance(result, BaseException):
            await unload_span(c, member, entry.name, first, last, entry.digest)
    failure = failures[0]
    if isinstance(failure, Exception):
        raise type(failure)(f"{failure}; nothing was switched, the serving version goes on")
    raise failure


def flip(c: Coordinator, name: str, entry: ModelEntry, placement: Placement) -> None:
    """The one step: the model's route is the new digest's from now on; the old version's
    slots are retired once its work in flight is done."""
    old, old_placement = c.models.get(name), c.placements.get(name)
    c.models[name] = entry
    c.placements[name] = placement
    c.save_pinned()
    c.metrics.switches.labels(name).inc()
    log.info("%s now serves v%s (%s): %s", name, entry.version, entry.digest[:19],
             placement.as_dict())  # fmt: skip
    if old is not None and old_placement is not None:
        c.retiring[old.digest] = (old, old_placement)  # now, not when the task first runs
        if old.digest != entry.digest:
            log.info(
                "%s v%s: %d request(s) and %d sequence(s) in flight finish on it",
                name, old.version, c.in_flight.get(old.digest, 0),
                c.live_sequences.get(old.digest, 0),
            )  # fmt: skip
        task = asyncio.get_running_loop().create_task(
            retire(c, name, old, old_placement, slots(entry, placement))
        )
        c.track(task)


async def wait_drained(c: Coordinator, digest: str) -> None:
    """Until no hop nor live sequence of ``digest`` is in flight, or drain_timeout_s passed."""
    end = time.monotonic() + c.config.drain_timeout_s
    while time.monotonic() < end:
        if not c.in_flight.get(digest) and not c.live_sequences.get(digest):
            return
        await asyncio.sleep(0.05)
    log.warning(
        "%d hop(s) and %d sequence(s) of %s still in flight after drain_timeout_s: retiring it",
        c.in_flight.get(digest, 0), c.live_sequences.get(digest, 0), digest[:19],
    )  # fmt: skip


async def retire(
    c: Coordinator, name: str, old: ModelEntry, placement: Placement, keep: set[Slot]
) -> None:
    try:
        await wait_drained(c, old.digest)
        members = c.cluster.members
        for node, digest, first, last in sorted(slots(old, placement) - keep):
            if node in members:
                await unload_span(c, members[node], name, first, last, digest)
        if old.digest != c.models[name].digest and c.cache is not None:
            c.cache.drop_digest(old.digest)  # unreachable now: free the space
    finally:
        c.retiring.pop(old.digest, None)


async def switch(
    c: Coordinator,
    name: str,
    stages: int | None,
    replicas: int | None,
    version: int | None,
    allow_downtime: bool,
) -> Placement:
    new = open_entry(c.repo, name, version)
    old, old_placement = c.models.get(name), c.placements.get(name)
    now = time.monotonic()
    live = c.cluster.live(now)
    kind = new.manifest.kind
    able = [m for m in live if kind in m.kinds]
    if live and not able:
        raise DoesNotFit(
            f"cannot place {name}: it is a {kind} package and none of the live nodes "
            f"({', '.join(m.node_id for m in live)}) serves that kind; upgrade them"
        )
    if not able:
        raise NoLiveReplica(f"no node has joined the ring; cannot place {name}")
    current = old_placement.spans if old_placement else ()
    stages = choose_stages(
        stages, len(new.manifest.default_stages), c.config.stages, len(current), len(new.sizes)
    )
    replicas = replicas or min((len(s.replicas) for s in current), default=c.config.replicas)
    number = (old_placement.version + 1) if old_placement else 1
    same = old is not None and old.digest == new.digest
    c.loading[name] = new
    try:
        try:
            placement = place(
                new.sizes,
                capacities(c, able, new.digest if same else None),
                replicas,
                stages,
                version=number,
                **link_terms(c, new),
            )
        except DoesNotFit as short:
            if old is None or old_placement is None or same:
                raise DoesNotFit(f"cannot place {name}: {short}") from short
            if all(len(s.replicas) >= 2 for s in old_placement.spans):
                return await rolling(c, name, new, able, stages, replicas, number)
            if not allow_downtime:
                raise DoesNotFit(
                    f"cannot load {name} v{new.version} next to v{old.version}, which serves: "
                    f"{short}; a rolling switch needs 2 replicas of every span; or pass "
                    '"parameters": {"allow_downtime": true} to unload the old version first'
                ) from short
            return await with_downtime(c, name, new, able, stages, replicas, number)
        await load_all(c, new, placement)
        flip(c, name, new, placement)
        return placement
    finally:
        c.loading.pop(name, None)


async def with_downtime(
    c: Coordinator,
    name: str,
    new: ModelEntry,
    members: list[Member],
    stages: int | None,
    replicas: int,
    number: int,
) -> Placement:
    """The old version unloaded first, then the new one loaded: requests meanwhile get 503."""
    old, old_placement = c.models.pop(name), c.placements.pop(name)
    c.save_pinned()
    await wait_drained(c, old.digest)
    by_id = c.cluster.members
    for node, digest, first, last in sorted(slots(old, old_placement)):
        if node in by_id:
            await unload_span(c, by_id[node], name, first, last, digest)
    fresh = [by_id[m.node_id] for m in members if m.node_id in by_id]  # spans just unloaded
    placement = place(
        new.sizes, capacities(c, fresh), replicas, stages, version=number, **link_terms(c, new)
    )
    await load_all(c, new, placement)
    c.models[name], c.placements[name] = new, placement
    c.save_pinned()
    return placement


async def rolling(
    c: Coordinator,
    name: str,
    new: ModelEntry,
    members: list[Member],
    stages: int | None,
    replicas: int,
    number: int,
) -> Placement:
    """One replica of every span leaves the old routes and takes the new chain; the route
    flips; the other replicas then take the new spans too."""
    old, old_placement = c.models[name], c.placements[name]
    taken = {s.replicas[-1] for s in old_placement.spans}
    reduced = Placement(
        old_placement.version,
        tuple(replace(s, replicas=tuple(r for r in s.replicas if r not in taken))
              for s in old_placement.spans),
    )  # fmt: skip
    if any(not s.replicas for s in reduced.spans):
        raise DoesNotFit(
            f"cannot switch {name} by rolling: a node holds every replica of a span of "
            f"v{old.version}; give each span replicas on distinct nodes"
        )
    by_id = c.cluster.members
    c.placements[name] = reduced  # the taken nodes leave the old routes
    freed = [(n, d, f, la) for n, d, f, la in slots(old, old_placement) if n in taken]
    for node, digest, first, last in sorted(freed):  # a hop still on its way is 409: retried
        if node in by_id:
            await unload_span(c, by_id[node], name, first, last, digest)
    # heartbeats replace member records: read them again, with the spans just unloaded gone
    chain_nodes = [m for n, m in by_id.items() if n in taken]
    try:
        chain = place(
            new.sizes, capacities(c, chain_nodes), 1, stages, version=number, **link_terms(c, new)
        )
        await load_all(c, new, chain)
    except BaseException:
        c.placements[name] = old_placement  # as it was: reload the old spans there
        for node, _, first, last in sorted(freed):
            if node in by_id:
                await load_span(c, by_id[node], old, first, last)
        raise
    flip(c, name, new, chain)  # the old version keeps its other replicas until drained
    await wait_drained(c, old.digest)
    while old.digest in c.retiring:
        await asyncio.sleep(0.05)
    able = {m.node_id for m in members}
    rest = [m for n, m in c.cluster.members.items() if n in able and n not in taken]
    grown = grow_replicas(chain, capacities(c, rest), replicas - 1, number + 1)
    await load_all(c, new, grown)
    c.placements[name] = grown
    c.save_pinned()
    return grown


def grow_replicas(
    placement: Placement, nodes: list[NodeCapacity], extra: int, number: int
) -> Placement:
    """``placement`` with up to ``extra`` more replicas per span on ``nodes`` (the freest
    first, distinct per span, within their budgets): a pure choice."""
    free = {n.node_id: n.memory_budget for n in nodes}
    spans: list[SpanAssignment] = []
    for span in placement.spans:
        need = span_need(span.bytes)
        added: list[str] = []
        for node in sorted(free, key=lambda k: -free[k]):
            if len(added) == extra:
                break
            if node not in span.replicas and free[node] >= need:
                free[node] -= need
                added.append(node)
        spans.append(replace(span, replicas=span.replicas + tuple(added)))
    return Placement(number, tuple(spans))
