"""A generation streamed as server-sent events, and what keeps one client's streams from
holding the ring: at most ``max_streams_per_client`` streams per client, and a stream whose
client stops reading is ended through the same path as a disconnect.

A client is who ``appliance.security.auth.client_identity`` says: its token's caller, else its
address (so apps on one host without tokens share one count). A stream also counts as a request
in flight for ``max_concurrent_per_client``: the two limits apply together.

A run is pulled one chunk at a time: while a write waits for a slow reader no step runs for its
sequence, and the other sequences never wait for it. Its output buffer is bounded
(``stream_buffer_bytes`` for the kernel's send buffer and for the transport before it pauses;
aiohttp adds up to 64 KiB before it waits); a write that waits longer than
``stream_write_timeout_s`` ends the stream, its sequence freed on every span.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from aiohttp import ClientConnectionResetError, web

from appliance.coordinator.generation.run import Chunk, GenerationRun
from appliance.coordinator.keys import coordinator_of
from appliance.errors import TooManyRequests
from appliance.http.errors import openai_error, status_of
from appliance.security.auth import client_identity

log = logging.getLogger(__name__)


class StreamStalled(ConnectionResetError):
    """The client did not take a chunk within stream_write_timeout_s (handled as a reset)."""


@contextlib.contextmanager
def stream_slot(counts: dict[str, int], client: str, limit: int) -> Iterator[None]:
    """One of ``client``'s at most ``limit`` streams (0: no limit), or 429."""
    if limit and counts.get(client, 0) >= limit:
        raise TooManyRequests(
            f"this client has {limit} streams open, the most allowed (max_streams_per_client); "
            "finish one, or ask without stream"
        )
    counts[client] = counts.get(client, 0) + 1
    try:
        yield
    finally:
        counts[client] -= 1
        if not counts[client]:
            del counts[client]


def bound_output(request: web.Request, limit_bytes: int) -> None:
    """Cap what this connection buffers for a reader that does not read."""
    transport = request.transport
    if transport is None or limit_bytes <= 0:
        return
    transport.set_write_buffer_limits(high=limit_bytes)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # the kernel doubles it, and may round it up
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(4096, limit_bytes // 2))


async def sse(
    request: web.Request,
    run: GenerationRun,
    event: Callable[[Chunk], dict[str, Any] | None],
    last: Callable[[], list[dict[str, Any]]] = list,
    done: bool = True,
) -> web.StreamResponse:
    """Stream a run as server-sent events: one ``data:`` line per chunk; an error after the
    answer started is sent as an event (the status is gone by then)."""
    coordinator = coordinator_of(request)
    config = coordinator.config
    client = client_identity(request)
    with stream_slot(coordinator.streams_by_client, client, config.max_streams_per_client):
        chunks = run.chunks()
        first = await anext(chunks, None)  # errors before the first token are answered as such
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        bound_output(request, config.stream_buffer_bytes)

        async def send(payload: dict[str, Any] | bytes) -> None:
            data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
            try:
                async with asyncio.timeout(config.stream_write_timeout_s):
                    await response.write(b"data: " + data + b"\n\n")
            except TimeoutError:
                coordinator.metrics.stalled_streams.inc()
                if request.transport is not None:
                    request.transport.abort()  # what it has not read is dropped with it
                raise StreamStalled(
                    f"{client} did not read its stream for {config.stream_write_timeout_s:g}s"
                ) from None

        try:
            if first is not None:
                if (payload := event(first)) is not None:
                    await send(payload)
                async for chunk in chunks:
                    if (payload := event(chunk)) is not None:
                        await send(payload)
            for payload in last():
                await send(payload)
        except (ConnectionResetError, ClientConnectionResetError) as exc:
            log.info("stream of %s ended: %s", client, exc)
            raise  # nobody to tell (the sequence is closed below)
        except Exception as exc:  # the client sees why its stream ended early
            await send(_stream_error(request, exc))
        finally:
            await chunks.aclose()  # frees the sequence on every span at once
        if done:
            await send(b"[DONE]")
        await response.write_eof()
        return response


def _stream_error(request: web.Request, exc: Exception) -> dict[str, Any]:
    status = status_of(exc) or 500
    if request.path.startswith("/v1/"):
        return openai_error(status, str(exc), getattr(exc, "param", None))
    return {"error": str(exc)}
