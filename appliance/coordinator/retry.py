"""Backoff and log de-duplication for the coordinator's background attempts (placing a model
again, placing the configured models once nodes join)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Retry:
    """Backoff and log de-duplication of a repeated background attempt: one warning per series
    of the same message, attempts spaced 1 s, 2 s, 4 s ... up to 60 s."""

    def __init__(self) -> None:
        self.next_at = 0.0
        self.backoff_s = 1.0
        self.attempts = 0
        self._said: set[str] = set()

    def say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.warning("%s", message)

    def failed(self, now: float, message: str) -> None:
        self.attempts += 1
        self.say(f"{message} (retrying with backoff; said once per series)")
        self.next_at = now + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, 60.0)

    def reset(self) -> None:
        self.next_at, self.backoff_s, self.attempts = 0.0, 1.0, 0
        self._said.clear()
