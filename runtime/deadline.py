"""The one deadline type: an instant on this process's monotonic clock.

Inside a process every deadline is a ``Deadline`` (the batcher's queue, the hop batcher, the hop
client, a request's ``timeout`` parameter), so none can be mistaken for an epoch time or for a
duration. Only the ring's wire format converts it, in ``appliance.ring.protocol``: the monotonic
clocks of two hosts have nothing in common.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Deadline:
    at: float  # time.monotonic() of this process

    @staticmethod
    def after(seconds: float) -> Deadline:
        return Deadline(time.monotonic() + seconds)

    def remaining(self, now: float | None = None) -> float:
        """Seconds left (negative once passed)."""
        return self.at - (time.monotonic() if now is None else now)

    def expired(self, now: float | None = None) -> bool:
        return self.remaining(now) <= 0

    def cap(self, seconds: float) -> Deadline:
        """This deadline, or ``seconds`` from now if that comes first."""
        return min(self, Deadline.after(seconds))


def earliest(deadlines: Iterable[Deadline | None]) -> Deadline | None:
    """The first of the given deadlines; None when none is set."""
    known = [d for d in deadlines if d is not None]
    return min(known) if known else None
