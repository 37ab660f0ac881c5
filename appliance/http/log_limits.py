"""No log floods: a line repeated (same logger, level and error type, and the same message
template for warnings and errors, the same message for info lines) is written once per
interval; the next one written says how many were suppressed meanwhile.

Installed on the process's one handler by ``configure_logging``, so it covers every logger:
aiohttp's tracebacks for malformed requests, asyncio's, refused signatures, hop failures. The
access log is exempt: one line per request is its shape, and its size is the traffic's;
except the lines a record marks with a ``repeat_key`` (the 408s of bodies that never came
whole: a flood of stalled connections is not traffic, and wrote 4 MB in 30 s at 20,000).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

EXEMPT = ("appliance.access",)
_MAX_KINDS = 4096  # distinct kinds remembered; past it the oldest are forgotten


@dataclass
class _Kind:
    window_start: float
    suppressed: int = 0


class RepeatFilter(logging.Filter):
    def __init__(
        self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self.suppressed_total = 0
        self._kinds: dict[tuple[str, int, str, str], _Kind] = {}
        self._lock = threading.Lock()  # records come from threads too (LMDB writers, jobs)

    def filter(self, record: logging.LogRecord) -> bool:
        repeat_key: str | None = getattr(record, "repeat_key", None)
        if self.interval_s <= 0 or record.levelno < logging.INFO:
            return True
        if record.name in EXEMPT and repeat_key is None:
            return True
        if getattr(record, "repeat_summary", False):
            return True
        error = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        # warnings and errors repeat by template (a flood of one failure with varying peers
        # and ids is one kind); an info line only when it says exactly the same thing again:
        # "node a left" and "node b left" are two facts, never one suppressed under the other
        template = str(record.msg) if record.levelno >= logging.WARNING else record.getMessage()
        template = repeat_key if repeat_key is not None else template
        key = (record.name, record.levelno, template, error)
        now = self.clock()
        with self._lock:
            kind = self._kinds.get(key)
            if kind is not None and now - kind.window_start < self.interval_s:
                kind.suppressed += 1
                self.suppressed_total += 1
                return False
            suppressed = kind.suppressed if kind is not None else 0
            if kind is not None:
                del self._kinds[key]  # re-inserted last: the dict stays in order of use
            elif len(self._kinds) >= _MAX_KINDS:
                del self._kinds[next(iter(self._kinds))]
            self._kinds[key] = _Kind(now)
        if suppressed:
            record.msg = f"{record.msg} [{suppressed} more like this suppressed in the last " + (
                f"{self.interval_s:g} s or more]"
            )
        return True

    def flush(self) -> None:
        """Say, for each kind whose interval is over, how many lines were suppressed in it
        (no later line of that kind may come to say it)."""
        now = self.clock()
        with self._lock:
            due = [
                (key, kind.suppressed)
                for key, kind in self._kinds.items()
                if kind.suppressed and now - kind.window_start >= self.interval_s
            ]
            for key, _ in due:
                self._kinds[key].suppressed = 0
        for (name, level, msg, error), count in due:
            logging.getLogger(name).log(
                level,
                "%d more line(s) like %r%s were suppressed in the last %g s",
                count,
                msg[:200],
                f" ({error})" if error else "",
                self.interval_s,
                extra={"repeat_summary": True},
            )

    def pending(self) -> int:
        """Lines suppressed that no later line has reported yet."""
        with self._lock:
            return sum(kind.suppressed for kind in self._kinds.values())


_installed: RepeatFilter | None = None


def install(handler: logging.Handler, interval_s: float) -> RepeatFilter:
    global _installed
    repeat = RepeatFilter(interval_s)
    handler.addFilter(repeat)
    _installed = repeat
    return repeat


def installed() -> RepeatFilter | None:
    """The process's filter (for /metrics); None when logging was not configured here."""
    return _installed
