"""Decode ahead: a span holding the whole model runs a sequence's next step before it is asked.

When one node holds every segment, the token it samples is the very next step's input: the
coordinator only detokenises it, streams it and sends it back. Waiting for that round trip
left the node idle between decode batches (profiled on SmolLM2 through ``appliance serve``
with 32 streams: the decoder thread ran 86 % of the time, the coordinator's loop spent about a
tenth of each step on answers, SSE writes and the next call). So once a step's token is drawn,
the same sequence's next step (that token, one position on) is submitted to the batcher at
once, and joins the next decode batch with the others'. The coordinator's step for it then
finds it running or done.

A step that arrives for something else (another position or token: a replay, a changed
chain) waits for the run ahead to end and undoes it (the KV is cut back) before it runs; a
sequence that stops (EOS, a stop string, max_tokens, a client gone) is closed by the
coordinator and its run ahead, one step at most, is thrown away. The draw depends on (seed,
position) only, so a token run ahead is the token the asked step would have drawn. Nothing
runs ahead past the tokens the sequence reserved.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Ahead:
    """A step run before it was asked: at ``position``, fed ``token``."""

    position: int
    token: int
    future: asyncio.Future[Any]

    def matches(self, position: int, inputs: np.ndarray) -> bool:
        return (
            position == self.position
            and inputs.ndim == 2
            and inputs.shape == (1, 1)
            and int(inputs[0, 0]) == self.token
        )

    async def settle(self) -> None:
        """Wait for the run to end, whatever it gave (its result is not wanted)."""
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(self.future)


def ahead_inputs(token: int) -> np.ndarray:
    return np.asarray([[token]], dtype=np.int64)


def quiet(future: asyncio.Future[Any]) -> None:
    """A run ahead nobody collects (its sequence stopped) must not log an unretrieved error."""
    if not future.cancelled():
        future.exception()
