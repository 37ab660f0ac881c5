"""Generation streams on test hosts whose span node's cable is pulled mid-answer: the tiny Llama
in 2 spans x 2 replicas, greedy streams from the client host (OpenAI's client, over TLS). The
streams run once undisturbed, then again with the cable of a node holding live sequences pulled
once every stream has a token: its hops hang (no reset), ``step_timeout_s`` counts its chain as
lost and the coordinator replays the sequences elsewhere. A stream fails if it ends in an error
or its tokens differ from the undisturbed run's."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai

from tests.support.faults.common import metric_sum
from tests.support.hosts import HostRing
from tests.support.streams import Stream, streams_at_once
from tests.support.tiny_llm import shared_tiny_package

MODEL = "tiny-llm"
PROMPTS = ["a", "the sun", "once upon", "def f(", "water", "my way", "quick", "1969"]


def tiny_repo(repo: Path) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    (repo / MODEL).symlink_to(shared_tiny_package() / MODEL)  # read-only, exported once
    return repo


def run_streams(
    ring: HostRing, count: int, tokens: int, fault: Callable[[], None] | None = None
) -> list[Stream]:
    """``count`` greedy streams at once from the client host; ``fault`` runs once every stream
    has a token."""
    context = ssl.create_default_context(cafile=ring.pki["ca"])
    client = openai.OpenAI(
        base_url=ring.url + "/v1", api_key="none", max_retries=0, timeout=120,
        http_client=openai.DefaultHttpxClient(verify=context, timeout=120),
    )  # fmt: skip
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    # the streams' sockets are the client host's
    return streams_at_once(client, MODEL, prompts, tokens, fault,
                           lambda: ring.hosts.inside(ring.client_host), timeout_s=180)  # fmt: skip


def busy_node(ring: HostRing) -> str:
    """A node holding KV for a live sequence, by a heartbeat sent after this call began: an
    older one may still show the previous run's sequences (or, by ``sequences``, the idle
    ones kept for prefix reuse), whose node this run's streams need not use."""
    began = time.monotonic()
    end = began + 10
    while time.monotonic() < end:
        for node in ring.cluster()["nodes"]:
            fresh = node["last_seen_s"] < time.monotonic() - began
            if fresh and node["load"].get("kv_reserved_bytes", 0) > 0:
                return str(node["node_id"])
        time.sleep(0.05)
    raise AssertionError("no node reported a live sequence")


def stream_with_pulled_link(ring: HostRing, count: int = 4, tokens: int = 120) -> dict[str, Any]:
    reference = run_streams(ring, count, tokens)
    assert not [s.error for s in reference if s.error], [s.error for s in reference]
    victim: list[str] = []

    def pull() -> None:
        victim.append(busy_node(ring))
        ring.hosts.pull(ring.node_hosts[victim[0]])

    replays = _replays(ring)
    pulled_at = time.monotonic()
    try:
        disturbed = run_streams(ring, count, tokens, pull)
    finally:
        if victim:
            ring.hosts.plug(ring.node_hosts[victim[0]])
    took = time.monotonic() - pulled_at
    wrong = [
        i for i, (s, r) in enumerate(zip(disturbed, reference, strict=True))
        if s.error or s.ids != r.ids
    ]  # fmt: skip
    return {
        "victim": victim[0] if victim else "",
        "streams": count,
        "tokens": tokens,
        "failed": len(wrong),
        "errors": [s.error for s in disturbed if s.error],
        "largest_gap_s": round(max(s.largest_gap_s for s in disturbed), 2),
        "reference_largest_gap_s": round(max(s.largest_gap_s for s in reference), 2),
        "seconds": round(took, 1),
        "replays": int(_replays(ring) - replays),
    }


def _replays(ring: HostRing) -> float:
    with ring.hosts.inside(ring.client_host):
        return metric_sum(ring.url, "appliance_generation_replays_total")
