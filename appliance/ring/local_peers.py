"""Ring members that share this process: one machine, one process (``appliance serve
--in-process-node``).

A node running inside the coordinator's process registers its base URL and its ring calls
here; a hop, sequence open, step or close addressed to that URL is then a function call, not a
loopback HTTP exchange (no socket, no HTTP parsing, no signature: the caller is this process).
Every other call, and every call to any other member, goes over the network as before. The
node keeps its socket for the remote members of the ring. This is where ``coordinator/`` and
``node/`` meet: neither imports the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from appliance.ring.hop_transport import HopAnswer, HopPost

# (path, headers, body) -> the answer an HTTP call would have had
LocalCall = Callable[[str, Mapping[str, str], bytes], Awaitable[HopAnswer]]


@dataclass
class LocalPeers:
    # by base URL: the paths that member answers in process, and its call
    members: dict[str, tuple[frozenset[str], LocalCall]] = field(default_factory=dict)
    # told the base URL of each call answered in process (the coordinator's metrics)
    observers: list[Callable[[str], None]] = field(default_factory=list)

    def add(self, base_url: str, paths: frozenset[str], call: LocalCall) -> None:
        self.members[base_url.rstrip("/")] = (paths, call)

    def remove(self, base_url: str) -> None:
        self.members.pop(base_url.rstrip("/"), None)

    def local(self, url: str) -> tuple[LocalCall, str, str] | None:
        """The in-process call for ``url``, its base and path; None: it goes over the network."""
        scheme_end = url.find("//")
        cut = url.find("/", scheme_end + 2) if scheme_end >= 0 else -1
        if cut < 0:
            return None
        base, path = url[:cut], url[cut:]
        member = self.members.get(base)
        if member is None or path not in member[0]:
            return None
        return member[1], base, path

    def wrap(self, post: HopPost) -> HopPost:
        """``post`` with the calls to members of this process answered in process."""

        async def send(url: str, headers: dict[str, str], body: bytes, timeout: float) -> HopAnswer:
            found = self.local(url)
            if found is None:
                return await post(url, headers, body, timeout)
            call, base, path = found
            async with asyncio.timeout(timeout):  # as a network call would be cut off
                answer = await call(path, headers, body)
            for observe in self.observers:
                observe(base)
            return answer

        return send
