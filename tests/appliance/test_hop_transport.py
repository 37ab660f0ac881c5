"""The lean hop client against real servers: keep-alive, stale connections, chunked answers,
peers that break the exchange, timeouts."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from appliance.ring.hop_transport import HopTransport, HopTransportError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler, keepalive_timeout: float = 75.0) -> str:
        app = web.Application()
        app.router.add_post("/internal/hop", handler)
        runner = web.AppRunner(app, keepalive_timeout=keepalive_timeout)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}/internal/hop"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_hops_reuse_one_connection_and_carry_headers_and_body(serve) -> None:
    peers: set[object] = set()

    async def echo(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        body = await request.read()
        return web.Response(body=body[::-1], headers={"X-Seen": request.headers["X-Thing"]})

    url = await serve(echo)
    transport = HopTransport()
    for i in range(20):
        answer = await transport.post(url, {"X-Thing": str(i)}, b"abc" * i, 5)
        assert (answer.status, answer.body, answer.headers["x-seen"]) == (200, b"cba" * i, str(i))
    assert len(peers) == 1
    await transport.close()


async def test_a_kept_connection_the_peer_closed_is_replaced_without_an_error(serve) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    url = await serve(ok, keepalive_timeout=0.05)
    transport = HopTransport()
    for _ in range(3):
        assert (await transport.post(url, {}, b"x", 5)).body == b"x"
        await asyncio.sleep(0.2)  # the server has closed the idle connection by now
    await transport.close()


async def test_a_chunked_answer_is_read_whole(serve) -> None:
    async def chunks(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"one,", b"two,", b"three"):
            await response.write(part)
        await response.write_eof()
        return response

    transport = HopTransport()
    url = await serve(chunks)
    for _ in range(2):  # and the connection stays usable after it
        assert (await transport.post(url, {}, b"", 5)).body == b"one,two,three"
    await transport.close()


async def test_refused_cut_off_and_slow_peers_raise_for_failover(serve) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    transport = HopTransport()
    with pytest.raises(HopTransportError, match="cannot connect"):
        await transport.post(f"http://127.0.0.1:{closed_port}/internal/hop", {}, b"x", 5)

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(HopTransportError, match="cut off"):
        await transport.post(f"http://127.0.0.1:{port}/internal/hop", {}, b"", 5)
    server.close()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(body=b"late")

    url = await serve(slow)
    with pytest.raises(TimeoutError):
        await transport.post(url, {}, b"", 0.1)
    assert sum(len(idle) for idle in transport._idle.values()) == 0  # not kept: state unknown
    await transport.close()
