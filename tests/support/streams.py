"""Greedy generation streams sent at once through the OpenAI client, each token's arrival timed,
with a fault injected once every stream has its first token (tests/support/faults/generation.py
and tests/support/hosts_generation.py)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import openai


@dataclass
class Stream:
    prompt: str
    ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def largest_gap_s(self) -> float:
        return float(max(np.diff(self.times), default=0.0))


def streams_at_once(
    client: openai.OpenAI,
    model: str,
    prompts: list[str],
    tokens: int,
    fault: Callable[[], None] | None = None,
    launching: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    timeout_s: float = 300,
) -> list[Stream]:
    """The streams at once (threads started inside ``launching``: e.g. a test host's network
    namespace); ``fault`` runs once every stream has at least one token."""
    streams = [Stream(p) for p in prompts]
    started = threading.Barrier(len(streams) + 1, timeout=timeout_s)

    def run(stream: Stream) -> None:
        told = False
        try:
            events = client.completions.create(
                model=model, prompt=stream.prompt, max_tokens=tokens, temperature=0, stream=True,
                extra_body={"ignore_eos": True, "return_token_ids": True},
                extra_headers={"Cache-Control": "no-cache, no-store"},
            )  # fmt: skip
            for event in events:
                ids = (event.choices[0].model_extra or {}).get("token_ids") or []
                stream.ids += ids
                stream.times += [time.monotonic()] * len(ids)
                if ids and not told:
                    told = True
                    started.wait()
        except Exception as exc:  # counted as a failed stream
            stream.error = f"{type(exc).__name__}: {exc}"
        finally:
            if not told:
                started.abort()

    threads = [threading.Thread(target=run, args=(s,)) for s in streams]
    with launching():
        for thread in threads:
            thread.start()
    try:
        started.wait()
    except threading.BrokenBarrierError:
        # a stream ended before its first token: say which and why, not just that it broke
        for thread in threads:
            thread.join(timeout=timeout_s)
        failed = [(s.prompt[:40], s.error or f"{len(s.ids)} token(s)") for s in streams
                  if not s.ids or s.error]  # fmt: skip
        raise AssertionError(f"a stream ended before its first token: {failed}") from None
    if fault is not None:
        fault()
    for thread in threads:
        thread.join(timeout=timeout_s)
    return streams
