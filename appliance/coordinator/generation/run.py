"""The token loop: one sequence through its pinned route, driven by the coordinator.

Open (every span reserves KV for prompt + max_tokens), prefill (the prompt's ids, one step),
then one step per token: the last span samples and answers the token, the coordinator
detokenises it, checks the stop conditions and sends it back in as the next step. The
sequence is closed on every span when it ends, fails, or its client goes away (the task is
cancelled: the close still runs).

Why the coordinator drives the steps rather than the ring (the last node handing the token
straight to the first, as exo does): measured, the extra hops of a 3-span chain cost a few
per cent of a token's time (bench.generate), below the 10 % a ring loop would have to gain,
and only the coordinator can stream, cancel and (next) replay a sequence without a second
path back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import orjson

from appliance.coordinator.entries import ModelEntry
from appliance.coordinator.generation.requests import GenerationRequest
from appliance.coordinator.placement import Placement
from appliance.coordinator.switch import counting
from appliance.errors import BadRequest
from appliance.ring import protocol as rp
from appliance.ring.sequences import CLOSE, OPEN, STEP, SequenceRef, call_chain
from runtime.codec import encode_request
from runtime.deadline import Deadline
from runtime.text import PackageText, StopMatcher

if TYPE_CHECKING:
    from appliance.coordinator.service import Coordinator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    text: str  # new text, whole UTF-8 characters only
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def prompt_ids(text: PackageText, request: GenerationRequest) -> list[int]:
    if request.messages is not None:
        return text.encode(text.render_chat(request.messages))
    return text.encode(request.prompt or "")


class GenerationRun:
    def __init__(
        self,
        coordinator: Coordinator,
        entry: ModelEntry,
        placement: Placement,
        text: PackageText,
        request: GenerationRequest,
        request_id: str,
    ) -> None:
        info = entry.manifest.generation
        if info is None:
            raise BadRequest(f"model {entry.name} is not a generation model")
        self.c = coordinator
        self.entry = entry
        self.placement = placement
        self.text = text
        self.request = request
        self.ids = prompt_ids(text, request)
        if not self.ids:
            raise BadRequest("the prompt is empty once tokenised; give some text")
        context = info.context_length
        room = context - len(self.ids)
        if room < 1:
            raise BadRequest(
                f"the prompt is {len(self.ids)} tokens, the model's context is {context}: "
                "shorten it"
            )
        limit = coordinator.config.max_tokens_limit
        asked = request.max_tokens
        if asked is not None and asked > room:
            raise BadRequest(
                f"prompt ({len(self.ids)} tokens) + max_tokens ({asked}) exceed the model's "
                f"context of {context} tokens"
            )
        self.max_tokens = asked if asked is not None else min(room, limit)
        self.usage = Usage(prompt_tokens=len(self.ids))
        self.ref = SequenceRef(entry.name, entry.digest, uuid.uuid4().hex, request_id)
        self.deadline = Deadline.after(coordinator.config.generation_timeout_s)
        self.first_token_s: float | None = None

    def _route(self) -> list[rp.RouteStep]:
        """One replica per span, pinned for the sequence's life (its KV lives there)."""
        route = self.c.cluster.route(
            self.entry.name, self.entry.digest, len(self.entry.sizes), self.placement,
            time.monotonic(),
        )  # fmt: skip
        live = [u for u in route[0].replicas if not self.c.hops.is_ejected(u)]
        first = min(live or route[0].replicas, key=self._load_of)
        pinned = [rp.RouteStep(route[0].first, route[0].last, (first,))]
        pinned += [rp.RouteStep(s.first, s.last, s.replicas[:1]) for s in route[1:]]
        return pinned

    def _load_of(self, url: rp.PeerUrl) -> int:
        return self.c.sequences_on.get(url, 0)

    async def chunks(self) -> AsyncIterator[Chunk]:
        # counted from before it opens: a version switch retires these bytes only after
        with counting(self.c.live_sequences, self.entry.digest):
            async for chunk in self._chunks():
                yield chunk

    async def _chunks(self) -> AsyncIterator[Chunk]:
        post = self.c.clients.hop
        route = self._route()
        first_url = route[0].replicas[0]
        sampling = self.request.sampling
        opening = orjson.dumps(
            {
                "reserve": len(self.ids) + self.max_tokens,
                "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k,
                             "top_p": sampling.top_p, "seed": sampling.seed},
            }
        )  # fmt: skip
        await call_chain(post, OPEN, route, self.ref, self.deadline, opening)
        self.c.sequences_on[first_url] = self.c.sequences_on.get(first_url, 0) + 1
        metrics = self.c.metrics
        metrics.sequences.labels(self.entry.name).inc()
        metrics.tokens.labels(self.entry.name, "prompt").inc(len(self.ids))
        started = time.perf_counter()
        try:
            async for chunk in self._loop(route, started):
                yield chunk
        finally:
            self.c.sequences_on[first_url] -= 1
            metrics.sequences.labels(self.entry.name).dec()
            # freed on every span even when the client went away (this task is cancelled)
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._close(route))

    async def _close(self, route: list[rp.RouteStep]) -> None:
        try:
            await call_chain(self.c.clients.hop, CLOSE, route, self.ref, Deadline.after(5), b"{}")
        except Exception as exc:  # the nodes free it by their TTL
            log.info("closing sequence %s: %s", self.ref.sequence_id, exc)

    async def _loop(self, route: list[rp.RouteStep], started: float) -> AsyncIterator[Chunk]:
        info = self.entry.manifest.generation
        assert info is not None  # checked in __init__
        eos = set(info.eos_token_ids)
        detok = self.text.detokenizer(context=self.ids[-8:])
        stops = StopMatcher(self.request.stop)
        position, feed = 0, self.ids
        metrics = self.c.metrics
        last = started
        while True:
            token = await self._step(route, position, feed)
            now = time.perf_counter()
            if self.first_token_s is None:
                self.first_token_s = now - started
                metrics.ttft.labels(self.entry.name).observe(self.first_token_s)
            else:
                metrics.itl.labels(self.entry.name).observe(now - last)
            last = now
            position += len(feed)
            if token in eos and not self.request.ignore_eos:
                yield Chunk(_rest(detok.flush(), stops), [], "stop")
                return
            self.usage.completion_tokens += 1
            metrics.tokens.labels(self.entry.name, "completion").inc()
            text, matched = stops.push(detok.push(token))
            if matched:
                yield Chunk(text, [token], "stop")
                return
            if self.usage.completion_tokens >= self.max_tokens:
                yield Chunk(text + _rest(detok.flush(), stops), [token], "length")
                return
            yield Chunk(text, [token])
            feed = [token]

    async def _step(self, route: list[rp.RouteStep], position: int, ids: list[int]) -> int:
        body, length = encode_request({"input_ids": np.asarray([ids], dtype=np.int64)})
        answer = await call_chain(
            self.c.clients.hop, STEP, route, self.ref, self.deadline, body, position, length
        )
        return int(orjson.loads(answer)["token"])


def _rest(text: str, stops: StopMatcher) -> str:
    """The last text of a sequence: what the detokenizer held, through the stop matcher,
    then what the matcher held back (a partial stop string is text after all)."""
    emitted, matched = stops.push(text)
    return emitted if matched else emitted + stops.flush()
