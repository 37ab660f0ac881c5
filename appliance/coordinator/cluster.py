"""The coordinator's view of the ring: members, the spans they hold, and routes over them.

Plain data and pure methods (time is passed in), so membership and routing are tested without
a network; the coordinator's HTTP handlers only feed it joins, heartbeats and failures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from appliance.coordinator.placement import Placement
from appliance.errors import BadRequest, MemberConflict, NoLiveReplica, NotMember
from appliance.ring.protocol import NodeId, PeerUrl, RouteStep


@dataclass(frozen=True)
class HeldSpan:
    model: str
    version: str
    digest: str
    first: int
    last: int
    ready: bool = True
    bytes: int = 0  # its segments' bytes (what its memory need is counted from)

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.model, self.digest, self.first, self.last)


@dataclass
class Member:
    node_id: NodeId
    incarnation: str
    address: PeerUrl
    device: str
    memory_budget: int
    ring_index: int
    spans: list[HeldSpan] = field(default_factory=list)
    load: dict[str, Any] = field(default_factory=dict)
    last_seen: float = 0.0
    left_at: float | None = None  # it said it was stopping (a planned restart, a shutdown)
    joined_at: float = 0.0
    generation: int = 0  # the node's count of loads and unloads when it reported its spans
    protocol: int = 1  # what it speaks on /internal (2: generation)
    kinds: tuple[str, ...] = ("single_pass",)  # the package kinds it can serve
    links: list[dict[str, Any]] = field(default_factory=list)  # its links, as it reports them

    def holds(self, model: str, digest: str, first: int, last: int) -> bool:
        return any(
            s.model == model
            and s.digest == digest
            and s.first == first
            and s.last == last
            and s.ready
            for s in self.spans
        )

    def bytes_held_except(self, model: str, sizes: dict[str, list[int]]) -> int:
        """Segment bytes of the spans it holds of other models (what its budget already pays)."""
        total = 0
        for span in self.spans:
            if span.model != model and span.model in sizes:
                total += sum(sizes[span.model][span.first : span.last + 1])
        return total

    def as_dict(self, now: float, healthy: bool, ejected: bool) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "incarnation": self.incarnation,
            "address": self.address,
            "device": self.device,
            "memory_budget": self.memory_budget,
            "ring_index": self.ring_index,
            "healthy": healthy,
            "ejected": ejected,
            "last_seen_s": round(now - self.last_seen, 3),
            "left": self.left_at is not None,
            "spans": [s.__dict__ for s in self.spans],
            "protocol": self.protocol,
            "kinds": list(self.kinds),
            "load": self.load,
        }


def parse_member(raw: Any, now: float, ring_index: int) -> Member:
    """A Member from a join or heartbeat body; BadRequest naming what is missing."""
    if not isinstance(raw, dict):
        raise BadRequest("a join or heartbeat body must be a JSON object")
    try:
        spans = [
            HeldSpan(
                str(s["model"]),
                str(s["version"]),
                str(s["digest"]),
                int(s["first"]),
                int(s["last"]),
                bool(s.get("ready", True)),
                int(s.get("bytes", 0)),
            )
            for s in raw.get("spans", [])
        ]
        return Member(
            node_id=NodeId(str(raw["node_id"])),
            incarnation=str(raw["incarnation"]),
            address=PeerUrl(str(raw["address"]).rstrip("/")),
            device=str(raw.get("device", "cpu")),
            memory_budget=int(raw["memory_budget"]),
            ring_index=ring_index,
            spans=spans,
            load=dict(raw.get("load", {})),
            last_seen=now,
            joined_at=now,
            generation=int(raw.get("generation", 0)),
            protocol=int(raw.get("protocol", 1)),
            kinds=tuple(str(k) for k in raw.get("kinds", ["single_pass"])),
            links=[x for x in raw.get("links") or [] if isinstance(x, dict) and "to" in x],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(
            f"join/heartbeat needs node_id, incarnation, address, memory_budget and spans: {exc!r}"
        ) from exc


class Cluster:
    def __init__(self, node_timeout_s: float = 3.0) -> None:
        self.node_timeout_s = node_timeout_s
        self.members: dict[str, Member] = {}
        self._next_ring_index = 0

    def is_live(self, member: Member, now: float) -> bool:
        return member.left_at is None and now - member.last_seen <= self.node_timeout_s

    def leave(self, member: Member, now: float) -> None:
        """Out of routes at once; its gone-clock starts now (a leave is not a death)."""
        member.left_at = now

    def gone_since(self, node_id: str, now: float, default: float) -> float | None:
        """Since when a node has been away (last seen, or left), None while it is live;
        ``default`` for a node never seen (a placement restored before it rejoined)."""
        member = self.members.get(node_id)
        if member is None:
            return default
        if self.is_live(member, now):
            return None
        seen = member.last_seen
        return max(seen, member.left_at) if member.left_at is not None else seen

    def live(self, now: float) -> list[Member]:
        return sorted(
            (m for m in self.members.values() if self.is_live(m, now)), key=lambda m: m.ring_index
        )

    def join(self, raw: Any, now: float, old_is_alive: bool = False) -> Member:
        """Add a node, or replace the same id's previous incarnation once that one is gone.

        ``old_is_alive``: the caller probed the previous incarnation and it still answers as
        itself; then a second live node claims the id and is refused.
        """
        existing = self.members.get(str(raw.get("node_id"))) if isinstance(raw, dict) else None
        index = existing.ring_index if existing else self._next_ring_index
        member = parse_member(raw, now, index)
        if existing is not None and existing.incarnation != member.incarnation and old_is_alive:
            raise MemberConflict(
                f"node id {member.node_id} is already live at {existing.address} "
                f"(incarnation {existing.incarnation[:8]}); give this node another node_id"
            )
        if existing is None:
            self._next_ring_index += 1
        self.members[member.node_id] = member
        return member

    def heartbeat(self, raw: Any, now: float) -> Member:
        if not isinstance(raw, dict):
            raise BadRequest("a heartbeat body must be a JSON object")
        existing = self.members.get(str(raw.get("node_id")))
        if existing is None or existing.incarnation != str(raw.get("incarnation")):
            raise NotMember(f"node {raw.get('node_id')!r} is not a member (any more): join again")
        updated = parse_member(raw, now, existing.ring_index)
        updated.joined_at = existing.joined_at
        updated.left_at = existing.left_at  # one in flight when it left: it stays left
        if updated.generation < existing.generation:
            # built before a load the coordinator has already heard of: keep the newer spans
            updated.spans, updated.generation = existing.spans, existing.generation
        self.members[updated.node_id] = updated
        return updated

    def route(
        self,
        model: str,
        digest: str,
        segments: int,
        placement: Placement | None,
        now: float,
        exclude: frozenset[str] = frozenset(),
        silent_ok: bool = True,
    ) -> list[RouteStep]:
        """For every span in order, the live replicas holding exactly those bytes.

        The spans are the pinned placement's; without one (a coordinator that just restarted)
        they are read from what the nodes report holding. A node with another digest for the
        model is never in a route. ``silent_ok``: where no holder is live, fall back to silent
        ones (a request's try); readiness asks without, so that a coordinator cut off from its
        nodes says it is not ready.
        """
        live = [m for m in self.live(now) if m.address not in exclude]
        if placement is not None:
            spans = [(s.first, s.last, s.replicas) for s in placement.spans]
        else:
            spans = self._spans_from_nodes(model, digest, segments, live)
        route = []
        for first, last, preferred in spans:
            holders = [m for m in live if m.holds(model, digest, first, last)]
            if not holders and silent_ok:
                # Heartbeats can lag behind a saturated coordinator: a silent holder is worth a
                # try (the hop fails fast if it is really gone) rather than a certain 503.
                holders = [
                    m
                    for m in self.members.values()
                    if m.address not in exclude
                    and m.left_at is None
                    and m.holds(model, digest, first, last)
                ]
            order = {node: i for i, node in enumerate(preferred)}
            holders.sort(key=lambda m: (order.get(m.node_id, len(order)), m.ring_index))
            if not holders:
                raise NoLiveReplica(
                    f"no live replica of model {model} segments {first}-{last}; retry later"
                )
            route.append(RouteStep(first, last, tuple(m.address for m in holders)))
        return route

    @staticmethod
    def _spans_from_nodes(
        model: str, digest: str, segments: int, live: list[Member]
    ) -> list[tuple[int, int, tuple[str, ...]]]:
        held: dict[tuple[int, int], int] = {}
        for member in live:
            for span in member.spans:
                if span.model == model and span.digest == digest and span.ready:
                    held[(span.first, span.last)] = held.get((span.first, span.last), 0) + 1
        chain: list[tuple[int, int, tuple[str, ...]]] = []
        position = 0
        while position < segments:
            options = [(key, count) for key, count in held.items() if key[0] == position]
            if not options:
                raise NoLiveReplica(
                    f"no live node holds model {model} from segment {position}; load it "
                    "(POST /v2/repository/models/{model}/load)"
                )
            (first, last), _ = max(options, key=lambda kv: (kv[1], kv[0][1]))
            chain.append((first, last, ()))
            position = last + 1
        return chain
