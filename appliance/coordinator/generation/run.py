"""The token loop: one sequence through its pinned chain, driven by the coordinator.

Open (every span reserves KV for prompt + max_tokens), prefill (the prompt's ids, one step),
then one step per token: the last span samples and answers the token, the coordinator
detokenises it, checks the stop conditions and sends it back in as the next step. A chain that
loses a node is rebuilt and replayed (``chain``). The sequence is closed on every span when it
ends, fails, or its client goes away (a disconnect is checked before every step; a cancelled
task still closes). A greedy request is answered from the result cache when the same prompt
and settings were generated before on the same bytes.

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
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from appliance.coordinator.entries import ModelEntry
from appliance.coordinator.generation.chain import SequenceChain
from appliance.coordinator.generation.requests import GenerationRequest
from appliance.coordinator.placement import Placement
from appliance.coordinator.request_policy import CacheControl
from appliance.coordinator.switch import counting
from appliance.errors import BadRequest
from cache.keys import cache_key
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
    cached_tokens: int = 0  # of the prompt, not computed: the nodes held their KV

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},  # as OpenAI says it
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
        cache_control: CacheControl | None = None,
        disconnected: Callable[[], bool] = lambda: False,
    ) -> None:
        info = entry.manifest.generation
        if info is None:
            raise BadRequest(f"model {entry.name} is not a generation model")
        self.c = coordinator
        self.entry = entry
        self.text = text
        self.request = request
        self.disconnected = disconnected
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
        self.deadline = Deadline.after(coordinator.config.generation_timeout_s)
        self.chain = SequenceChain(
            coordinator, entry, placement, request.sampling, len(self.ids) + self.max_tokens,
            request_id, self.deadline, self.ids,
        )  # fmt: skip
        self.first_token_s: float | None = None
        self.cache_control = cache_control or CacheControl()
        self._eos = set(info.eos_token_ids)
        self._detok = text.detokenizer(context=self.ids[-8:])
        self._stops = StopMatcher(request.stop)

    @property
    def replays(self) -> int:
        return self.chain.replays

    def _cache_key(self) -> bytes | None:
        """Greedy requests only (the same prompt and settings give the same tokens)."""
        s = self.request.sampling
        if self.c.cache is None or not (s.temperature == 0 or s.top_k == 1):
            return None
        settings = [self.max_tokens, self.request.stop, self.request.ignore_eos]
        inputs: dict[str, np.ndarray] = {
            "prompt_ids": np.asarray(self.ids, dtype=np.int64),
            "settings": np.frombuffer(orjson.dumps(settings), dtype=np.uint8),
        }
        return cache_key(self.entry.digest, inputs, ["generated_ids"])

    async def chunks(self) -> AsyncGenerator[Chunk, None]:
        # counted from before it opens: a version switch retires these bytes only after
        with counting(self.c.live_sequences, self.entry.digest):
            key = self._cache_key()
            cached = None
            if key is not None and self.cache_control.read and self.c.cache is not None:
                cached = self.c.cache.get(key)
                outcome = "hit" if cached is not None else "miss"
                self.c.metrics.generation_cache.labels(self.entry.name, outcome).inc()
            if cached is not None:
                for token in cached["generated_ids"].tolist():
                    chunk = self._accept(int(token))
                    yield chunk
                    if chunk.finish_reason:
                        return
                return
            async for chunk in self._generate(key):
                yield chunk

    async def _generate(self, key: bytes | None) -> AsyncGenerator[Chunk, None]:
        chain = self.chain
        metrics = self.c.metrics
        metrics.sequences.labels(self.entry.name).inc()
        metrics.tokens.labels(self.entry.name, "prompt").inc(len(self.ids))
        started = last = time.perf_counter()
        generated: list[int] = []
        try:
            while True:
                if self.disconnected():
                    log.info("sequence %s: its client went away after %d token(s)",
                             chain.ref.sequence_id, len(generated))  # fmt: skip
                    return
                if not generated:  # open, then the prompt less its cached prefix
                    feed = await chain.begin()
                    self.usage.cached_tokens = chain.cached_tokens
                    metrics.tokens.labels(self.entry.name, "cached").inc(chain.cached_tokens)
                    token = await chain.step(feed)
                else:
                    token = await chain.step([generated[-1]])
                now = time.perf_counter()
                if self.first_token_s is None:
                    self.first_token_s = now - started
                    metrics.ttft.labels(self.entry.name).observe(self.first_token_s)
                else:
                    metrics.itl.labels(self.entry.name).observe(now - last)
                last = now
                generated.append(token)
                chunk = self._accept(token)
                yield chunk
                if chunk.finish_reason:
                    self._offer(key, generated)
                    return
        finally:
            metrics.sequences.labels(self.entry.name).dec()
            # freed on every span even when the client went away (this task is cancelled)
            with contextlib.suppress(BaseException):
                await asyncio.shield(chain.close())

    def _accept(self, token: int) -> Chunk:
        """The chunk one sampled token makes; with a finish reason when it ends the text."""
        if token in self._eos and not self.request.ignore_eos:
            return Chunk(_rest(self._detok.flush(), self._stops), [], "stop")
        self.usage.completion_tokens += 1
        self.c.metrics.tokens.labels(self.entry.name, "completion").inc()
        text, matched = self._stops.push(self._detok.push(token))
        if matched:
            return Chunk(text, [token], "stop")
        if self.usage.completion_tokens >= self.max_tokens:
            return Chunk(text + _rest(self._detok.flush(), self._stops), [token], "length")
        return Chunk(text, [token])

    def _offer(self, key: bytes | None, generated: list[int]) -> None:
        if key is not None and self.cache_control.write and self.c.cache is not None:
            ttl = self.c.cache_policies.get(self.entry.name, self.c.default_cache_policy)
            if ttl.enabled:
                self.c.cache.offer(key, {"generated_ids": np.asarray(generated, np.int64)},
                                   ttl.ttl_s)  # fmt: skip


def _rest(text: str, stops: StopMatcher) -> str:
    """The last text of a sequence: what the detokenizer held, through the stop matcher,
    then what the matcher held back (a partial stop string is text after all)."""
    emitted, matched = stops.push(text)
    return emitted if matched else emitted + stops.flush()
