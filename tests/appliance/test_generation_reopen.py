"""An open whose route went stale (a node no longer holds its span, as while a placement is
switched or a replica reloads) is pinned again: the client never sees the 409."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from appliance.node.keys import DECODERS
from appliance.ring import protocol as rp
from tests.conftest import StartCoordinator, wait_ready
from tests.support.tiny_ring import MODEL, start_tiny_ring


async def test_an_open_on_a_stale_route_is_pinned_again(
    start_coordinator: StartCoordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ring = await start_tiny_ring(start_coordinator, tmp_path)
    service = ring.service
    span = service.placements[MODEL].spans[1]
    node = ring.nodes[int(span.replicas[0].removeprefix("n"))]
    digest = service.entry(MODEL).digest
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 4, "temperature": 0}
    caplog.set_level(logging.INFO, "appliance.coordinator.generation.chain")
    slot = rp.slot_name(MODEL, span.first, span.last, digest)
    for _ in range(5):  # a heartbeat between the unload and the open shows no replica: again
        await wait_ready(ring.client, ring.url)
        for _ in range(300):  # the coordinator's upkeep loads the span back on its node
            if slot in node.app[DECODERS].slots:
                break
            await asyncio.sleep(0.05)
        # the span leaves its node behind the coordinator's back
        node.app[DECODERS].unload(slot)
        async with ring.client.post(ring.url + "/v1/completions", json=body) as r:
            answer = await r.json()
            status = r.status
        if any("open failed" in m for m in caplog.messages):
            break
    assert any("holds no generation span" in m for m in caplog.messages), caplog.messages
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == 4
