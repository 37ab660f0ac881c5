"""A sequence's chain of span replicas: pinned for its life, and rebuilt elsewhere when a node
of it dies or hangs, so the client sees no error and no token is lost.

The chain remembers every token id it has stepped (prompt and generated). When a step fails
(a node unreachable, hung — no answer within ``step_timeout_s`` and none to a liveness probe —
restarted without the sequence, or the node
before it reporting the next one lost), the replicas that do not answer a short liveness probe
are ejected, a new chain is pinned on live replicas, a new sequence is opened there and the
whole sequence so far is replayed as one prefill: its last step samples the next token, and
since draws depend on (seed, position) only, it is the token the lost chain would have drawn.
The surviving nodes of the old chain are told to free their part (the rest expire by TTL).

Why the whole sequence and not one span: a span's KV is built from the hidden states of the
span before it, which no node keeps; rebuilding one span means running the spans before it
again anyway. With prefix reuse on the nodes, the surviving spans' share of the replay is cheap.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np
import orjson

from appliance.coordinator.entries import ModelEntry
from appliance.coordinator.generation.chain_choice import ORIGIN, choose_chain
from appliance.coordinator.generation.prefix_routing import cached_prefix, held_blocks
from appliance.coordinator.placement import Placement
from appliance.errors import NoLiveReplica, SequenceLost, UpstreamError
from appliance.ring import protocol as rp
from appliance.ring.sequences import (
    CLOSE,
    GROUPED_STEPS_PROTOCOL,
    OPEN,
    STEP,
    SequenceRef,
    call_chain,
)
from runtime.codec import encode_request
from runtime.deadline import Deadline
from runtime.errors import DeadlineExceeded
from runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from appliance.coordinator.cluster import Member
    from appliance.coordinator.service import Coordinator

log = logging.getLogger(__name__)

# answers of a chain that another chain may not get: the node lost it (502/503/504), it does
# not hold those bytes or that sequence any more (409/410: restarted, unloaded)
LOST = {409, 410, 502, 503, 504}
# answers to an open that another chain may not get: the route was stale (409: a node no
# longer holds that span, as during a switch of placement) or a node could not reach the next;
# a 503 there is the nodes' KV budget speaking (full, retry later): the client's to see
REOPEN = {409, 410, 502, 504}
STALE_WINDOW_S = 10.0  # how long opens on stale routes are retried
PROBE_S = 1.0
_URL = re.compile(r"https?://[^\s/]+")
_SPAN = re.compile(r"holds no (?:generation )?span (\d+)-(\d+)")


def step_timeout(base_s: float, tokens: int) -> float:
    """How long a step waits before its chain's nodes are probed: ``step_timeout_s`` for a
    decode step, more for a prefill (one more ``step_timeout_s`` per 64 tokens)."""
    return base_s * (1 + tokens // 64)


def named_urls(message: str, route: list[rp.RouteStep]) -> set[str]:
    """The replicas of ``route`` an error message names (the node that lost the next one)."""
    pinned = {u for s in route for u in s.replicas}
    return {u for u in _URL.findall(message) if u in pinned}


def stale_urls(message: str, route: list[rp.RouteStep]) -> set[str]:
    """The replicas of ``route`` that said they hold no such span (a 409 names the span,
    ``span 23-29``): alive, but not to be pinned again for this sequence."""
    spans = {(int(a), int(b)) for a, b in _SPAN.findall(message)}
    return {u for s in route if (s.first, s.last) in spans for u in s.replicas}


class SequenceChain:
    def __init__(
        self,
        coordinator: Coordinator,
        entry: ModelEntry,
        placement: Placement,
        sampling: SamplingParams,
        reserve: int,
        request_id: str,
        deadline: Deadline,
        prompt: list[int] | None = None,
    ) -> None:
        self.c = coordinator
        self.entry = entry
        self.placement = placement
        self.sampling = sampling
        self.reserve = reserve
        self.request_id = request_id
        self.deadline = deadline
        self.prompt = prompt or []  # sent at open: the nodes may hold a prefix of it cached
        self.cached_tokens = 0  # of the prompt, that the first chain started from
        self.fed: list[int] = []  # every token id the chain's KV holds so far
        self.route: list[rp.RouteStep] = []
        self.ref = self._new_ref()
        self.replays = 0
        self._excluded: set[str] = set()
        self._suspects: set[str] = set()  # replicas a timed-out step found unresponsive
        self._grouped = False  # this chain's one-token steps go through c.step_groups
        self._counted: list[rp.PeerUrl] = []  # the nodes this chain counts on, a span each

    def _new_ref(self) -> SequenceRef:
        return SequenceRef(self.entry.name, self.entry.digest, uuid.uuid4().hex, self.request_id)

    @property
    def first_url(self) -> rp.PeerUrl:
        return self.route[0].replicas[0]

    def _count_on(self, urls: list[rp.PeerUrl]) -> None:
        """Count this sequence on the nodes of its chain ``urls`` ([]: on none). It counts from
        the moment it is pinned, not once its open is answered: a burst of sequences pinned in
        one turn of the loop would otherwise all see the same loads and all take one chain."""
        on = self.c.sequences_on
        for url in self._counted:
            on[url] -= 1
        for url in urls:
            on[url] = on.get(url, 0) + 1
        self._counted = list(urls)

    def _pin(self) -> list[rp.RouteStep]:
        """One replica per span: live, not ejected; the chain holding the longest cached
        prefix of the prompt, then the least loaded chain, then the lowest summed link
        latency (``chain_choice``)."""
        route = self.c.cluster.route(
            self.entry.name, self.entry.digest, len(self.entry.sizes), self.placement,
            time.monotonic(), frozenset(self._excluded),
        )  # fmt: skip
        members = {m.address: m for m in self.c.cluster.members.values()}
        candidates = [
            [u for u in step.replicas if not self.c.hops.is_ejected(u)] or list(step.replicas)
            for step in route
        ]
        holdings = [
            {u: held_blocks(m.load, self.entry.name, self.entry.digest).get((s.first, s.last))
             for u in options if (m := members.get(u)) is not None}
            for s, options in zip(route, candidates, strict=True)
        ]  # fmt: skip

        def cached(index: int, url: rp.PeerUrl) -> int:
            return cached_prefix(self.prompt, holdings[index].get(url)) if self.prompt else 0

        chosen = choose_chain(candidates, cached, self.c.sequences_on, self._latencies(members))
        self._count_on(chosen)
        # decode steps go grouped when every node of the chain answers grouped steps
        self._grouped = self.c.config.group_steps and all(
            (m := members.get(u)) is not None and m.protocol >= GROUPED_STEPS_PROTOCOL
            for u in chosen
        )
        return [rp.RouteStep(s.first, s.last, (u,)) for s, u in zip(route, chosen, strict=True)]

    def _latencies(self, members: dict[rp.PeerUrl, Member]) -> dict[tuple[str, str], float]:
        """Link latencies by URL: the coordinator's own (from ORIGIN) and the nodes' reports."""
        out: dict[tuple[str, str], float] = {}
        for link in self.c.clients.links.links.values():
            if link.known():
                out[(ORIGIN, link.peer)] = link.latency()
        for address, member in members.items():
            for report in member.links:
                value = report.get("latency_s")
                if isinstance(value, int | float):
                    out[(address, str(report.get("to")))] = float(value)
        return out

    async def open(self) -> int:
        """Pin a chain and open the sequence on it: the tokens of the prompt it holds cached
        (the smallest along the chain; 0 from nodes without prefix reuse)."""
        self.route = self._pin()
        fields: dict[str, object] = {
            "reserve": self.reserve,
            "sampling": {"temperature": self.sampling.temperature,
                         "top_k": self.sampling.top_k, "top_p": self.sampling.top_p,
                         "seed": self.sampling.seed},
        }  # fmt: skip
        if self.prompt:
            fields["prefix_ids"] = self.prompt
        answer = await call_chain(
            self.c.clients.hop, OPEN, self.route, self.ref, self.deadline, orjson.dumps(fields)
        )
        try:
            cached = orjson.loads(answer).get("cached_tokens", 0) if answer else 0
        except (orjson.JSONDecodeError, AttributeError):
            cached = 0
        if not isinstance(cached, int) or not 0 <= cached < max(len(self.prompt), 1):
            cached = 0  # a node's figure it cannot have: start from the beginning
        return cached

    async def begin(self) -> list[int]:
        """Open the sequence: the part of the prompt to step (what its chain holds cached is
        not run again). An open the chain could not take (``REOPEN``) is tried on a chain
        pinned anew: ``max_replays`` times at most when a node was lost, and for up to
        ``STALE_WINDOW_S`` when a live node only held no such span any more (a placement
        being switched, a replica reloading: the heartbeats catch up)."""
        lost = tries = 0
        stale_until = time.monotonic() + STALE_WINDOW_S
        while True:
            try:
                # a retry may find every replica of a span left out: it then waits for one
                self.cached_tokens = await (self._open_when_live() if tries else self.open())
                break
            except (SequenceLost, UpstreamError) as exc:
                if isinstance(exc, UpstreamError) and exc.status not in REOPEN:
                    raise  # a final answer (400, 503 KV full, 507): the same anywhere
                stale = isinstance(exc, UpstreamError) and exc.status == 409
                tries, lost = tries + 1, lost + (0 if stale else 1)
                over = time.monotonic() > stale_until if stale else lost > self.c.config.max_replays
                if over or self.deadline.remaining() <= 0.25:
                    raise
                await self._drop_chain(exc, stale)
        self.fed = self.prompt[: self.cached_tokens]
        return self.prompt[self.cached_tokens :]

    async def _drop_chain(self, exc: Exception, stale: bool) -> None:
        """Leave a chain whose open failed: the replicas that do not answer are ejected, those
        the error names are left out of the next chain, the sequence is freed where it was
        opened. After a stale route, or without anyone to blame, the next try waits a quarter
        of a second (a heartbeat or two)."""
        dead = await self._unresponsive(self.route)
        for url in dead:
            self.c.hops.eject(url, f"could not open sequence {self.ref.sequence_id}: {exc}")
        bad = dead | named_urls(str(exc), self.route) | stale_urls(str(exc), self.route)
        self._excluded |= bad
        self._forget(self.route, self.ref, bad)
        log.info("sequence %s: open failed (%s); pinning another chain", self.ref.sequence_id,
                 exc)  # fmt: skip
        self.ref = self._new_ref()
        if stale or not bad:
            await asyncio.sleep(0.25)

    async def step(self, ids: list[int]) -> int:
        """Step ``ids`` at the chain's position; the token its last span samples. A lost
        chain is rebuilt and the step replayed there (``max_replays`` times at most)."""
        try:
            token = await self._step(self.route, len(self.fed), ids)
        except (SequenceLost, UpstreamError, DeadlineExceeded) as exc:
            status = getattr(exc, "status", None)
            if isinstance(exc, UpstreamError) and status not in LOST:
                raise  # a final answer (400, 507): the same anywhere
            token = await self._replay(ids, exc)
        self.fed += ids
        return token

    async def _step(self, route: list[rp.RouteStep], position: int, ids: list[int]) -> int:
        """One step along ``route``. Past ``step_timeout`` without an answer the chain's nodes
        are probed: one that does not answer is a hang (the step is given up, the chain
        lost); when all answer, the step is queued behind others on a busy node and is waited
        for, up to the request's deadline."""
        budget = step_timeout(self.c.config.step_timeout_s, len(ids))
        call: asyncio.Future[Any]
        if self._grouped and len(ids) == 1:
            call = self.c.step_groups.step(route, self.ref, self.deadline, position, ids[0])
        else:
            body, length = encode_request({"input_ids": np.asarray([ids], dtype=np.int64)})
            call = asyncio.ensure_future(call_chain(
                self.c.clients.hop, STEP, route, self.ref, self.deadline, body, position, length
            ))  # fmt: skip
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=min(budget, self.deadline.remaining()))
                if done:
                    break
                if self.deadline.expired():
                    raise DeadlineExceeded(f"sequence {self.ref.sequence_id}: its deadline passed")
                self._suspects = await self._unresponsive(route)
                if self._suspects:
                    raise SequenceLost(
                        f"sequence {self.ref.sequence_id}: no answer to a step in {budget:g}s "
                        f"(step_timeout_s), and {', '.join(sorted(self._suspects))} did not "
                        "answer a liveness probe"
                    )
            answer = call.result()
        except SequenceLost:
            if self.deadline.expired():
                raise DeadlineExceeded(
                    f"sequence {self.ref.sequence_id}: its deadline passed"
                ) from None
            raise
        finally:
            if not call.done():
                call.cancel()
        return int((answer if isinstance(answer, dict) else orjson.loads(answer))["token"])

    async def _replay(self, ids: list[int], exc: Exception) -> int:
        """A new chain without the replicas that failed, the sequence so far replayed."""
        while True:
            self.replays += 1
            if self.replays > self.c.config.max_replays:
                raise SequenceLost(
                    f"sequence {self.ref.sequence_id} lost its chain {self.replays - 1} times; "
                    f"last: {exc}"
                ) from exc
            if self.deadline.expired():
                raise DeadlineExceeded(
                    f"sequence {self.ref.sequence_id}: its deadline passed while its chain "
                    f"was rebuilt ({exc})"
                ) from exc
            started = time.perf_counter()
            bad = self._suspects or await self._unresponsive(self.route)
            bad = bad or named_urls(str(exc), self.route)
            self._suspects = set()
            for url in bad:
                self.c.hops.eject(url, f"lost sequence {self.ref.sequence_id}: {exc}")
            self._excluded |= bad
            old_route, old_ref = self.route, self.ref
            self._forget(old_route, old_ref, bad)
            self.ref = self._new_ref()
            history = self.fed + ids
            try:
                cached = await self._open_when_live()
                token = await self._step(self.route, cached, history[cached:])
            except (SequenceLost, UpstreamError, DeadlineExceeded) as again:
                if isinstance(again, UpstreamError) and again.status not in LOST:
                    raise
                exc = again
                continue
            seconds = time.perf_counter() - started
            metrics = self.c.metrics
            metrics.replays.labels(self.entry.name).inc()
            metrics.replay_seconds.labels(self.entry.name).observe(seconds)
            log.info(
                "sequence %s: chain rebuilt without %s, %d token(s) replayed in %.2fs (%s)",
                old_ref.sequence_id, ", ".join(sorted(bad)) or "no node", len(self.fed) + len(ids),
                seconds, exc,
            )  # fmt: skip
            return token

    async def _open_when_live(self) -> int:
        """Open on a new chain; while a span has no live replica (nodes late with their
        heartbeats on a starved host, or the only others excluded), wait for one rather than
        fail the stream: exclusions are dropped first, then retried every 0.25 s until the
        deadline."""
        while True:
            try:
                return await self.open()
            except NoLiveReplica:
                if self._excluded:
                    self._excluded.clear()  # a replica that failed once may serve again
                    continue
                if self.deadline.remaining() <= 0.25:
                    raise
                await asyncio.sleep(0.25)

    async def _unresponsive(self, route: list[rp.RouteStep]) -> set[str]:
        """The replicas of ``route`` that do not answer a liveness probe within PROBE_S."""
        urls = [u for s in route for u in s.replicas]

        async def probe(url: str) -> bool:
            try:
                async with self.c.session.get(
                    url + "/v2/health/live", timeout=aiohttp.ClientTimeout(total=PROBE_S)
                ) as response:
                    return response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        answers = await asyncio.gather(*(probe(u) for u in urls))
        return {u for u, ok in zip(urls, answers, strict=True) if not ok}

    def _forget(self, route: list[rp.RouteStep], ref: SequenceRef, bad: set[str]) -> None:
        """Free the old sequence on the replicas that still answer (each on its own: the
        chain through a dead node would stop there); in the background."""
        for step in route:
            if step.replicas[0] in bad:
                continue
            task = asyncio.get_running_loop().create_task(self._close([step], ref))
            self.c.track(task)

    async def close(self) -> None:
        self._count_on([])
        await self._close(self.route, self.ref)

    async def _close(self, route: list[rp.RouteStep], ref: SequenceRef) -> None:
        if not route:
            return
        try:
            await call_chain(self.c.clients.hop, CLOSE, route, ref, Deadline.after(5), b"{}")
        except Exception as exc:  # the nodes free it by their TTL
            log.info("closing sequence %s: %s", ref.sequence_id, exc)
