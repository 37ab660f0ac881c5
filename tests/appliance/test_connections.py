"""Timeouts on every phase of a request and shedding at the connection cap: a real server (the
process runner's ``start_app`` on port 0) and real sockets that misbehave on purpose."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from appliance.config import ServerConfig
from appliance.http.app import new_app
from appliance.http.body import read_body
from appliance.http.connections import REQUEST, ConnectionTracker
from appliance.http.guards import GUARDS
from appliance.http.limits import Budget, ConnectionSettings, budget
from appliance.http.server import start_app
from appliance.security.signing import HEADER_SIGNATURE, Signer, new_secret

SECRET = new_secret()
BIG = 9 * 1024 * 1024  # over 8 MB: more than any socket buffer holds


@dataclass
class Served:
    url: str
    port: int
    tracker: ConnectionTracker
    runner: web.AppRunner


async def _echo(request: web.Request) -> web.Response:
    return web.Response(body=await read_body(request, 1 << 20))


async def _big(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * BIG)


async def _sleep(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "3")))
    return web.Response(text="slept")


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=b"# this server's own metrics would be here\n")


async def _ping(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text="pong")


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(cap: int = 0, **settings: Any) -> Served:
        config = ServerConfig(cluster_secrets=[SECRET], **settings)
        app = new_app(config, [web.post("/ping", _ping)])
        app.add_routes(
            [
                web.post("/echo", _echo),
                web.get("/big", _big),
                web.get("/sleep", _sleep),
                web.get("/metrics", _metrics),  # the runner's metrics are appended to it
            ]
        )
        cap_budget = Budget(1024, 128, cap) if cap else None
        runner, port = await start_app(app, "127.0.0.1", 0, budget=cap_budget)
        runners.append(runner)
        return Served(f"http://127.0.0.1:{port}", port, app[GUARDS].tracker, runner)

    yield start
    for runner in runners:
        await runner.cleanup()


async def metric_sum(url: str, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as client, client.get(url + "/metrics") as response:
        text = await response.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def _closed_after(reader: asyncio.StreamReader, limit_s: float) -> tuple[float, bytes]:
    """Seconds until the server closed the connection, and what it sent before."""
    started = time.monotonic()
    got = b""
    try:
        async with asyncio.timeout(limit_s):
            while chunk := await reader.read(65536):
                got += chunk
    except ConnectionResetError:
        pass
    return time.monotonic() - started, got


async def test_slow_headers_silence_and_idle_keep_alive_are_closed_in_time(serve) -> None:
    served = await serve(header_timeout_s=1.0, idle_timeout_s=1.5)
    silent = await asyncio.open_connection("127.0.0.1", served.port)
    partial = await asyncio.open_connection("127.0.0.1", served.port)
    partial[1].write(b"GET /sleep?s=0 HTTP/1.1\r\nHost: x\r\n")  # never the blank line
    kept = await asyncio.open_connection("127.0.0.1", served.port)
    kept[1].write(b"GET /sleep?s=0 HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await kept[0].readuntil(b"slept")
    assert head.startswith(b"HTTP/1.1 200")
    waits = await asyncio.gather(
        _closed_after(silent[0], 5), _closed_after(partial[0], 5), _closed_after(kept[0], 5)
    )
    (silent_s, silent_got), (partial_s, partial_got), (kept_s, _) = waits
    assert 0.9 <= silent_s <= 2.0 and silent_got == b""
    assert 0.9 <= partial_s <= 2.0 and partial_got == b""
    assert 1.4 <= kept_s <= 2.5
    assert served.tracker.closed["header_timeout"] == 2
    assert served.tracker.closed["idle_timeout"] == 1
    assert (
        await metric_sum(served.url, "appliance_connections_closed_total", reason="idle_timeout")
        == 1
    )


async def test_a_body_below_the_floor_gets_408_and_its_connection_closed(serve) -> None:
    served = await serve(body_grace_s=1.0, body_min_bytes_per_s=1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 102400\r\n\r\nx")
    seconds, got = await _closed_after(reader, 5)
    assert 0.9 <= seconds <= 2.0, seconds
    assert got.startswith(b"HTTP/1.1 408") and b'"error"' in got, got[:300]
    assert b"Connection: close" in got
    assert served.tracker.closed["body_too_slow"] == 1
    # a body at a good pace is not cut, even when it takes longer than the window
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 30000\r\n\r\n")
    for _ in range(15):
        writer.write(b"y" * 2000)
        await asyncio.sleep(0.1)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert len(await reader.readexactly(30000)) == 30000
    writer.close()


async def test_a_client_that_never_reads_its_answer_is_cut_by_the_write_timeout(serve) -> None:
    served = await serve(write_timeout_s=1.5)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", served.port))
    await asyncio.get_running_loop().sock_sendall(sock, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    started = time.monotonic()
    while served.tracker.closed["write_timeout"] == 0 and time.monotonic() - started < 6:
        await asyncio.sleep(0.05)
    cut_s = time.monotonic() - started
    sock.close()
    assert served.tracker.closed["write_timeout"] == 1
    assert 1.4 <= cut_s <= 2.6, cut_s
    assert (
        await metric_sum(served.url, "appliance_connections_closed_total", reason="write_timeout")
        == 1
    )


async def test_a_ring_members_pooled_connection_outlives_the_public_idle_timeout(serve) -> None:
    served = await serve(idle_timeout_s=1.0, member_idle_timeout_s=3.0)
    signer = Signer(SECRET.encode(), "node-a")
    member = await asyncio.open_connection("127.0.0.1", served.port)
    public = await asyncio.open_connection("127.0.0.1", served.port)
    signature = signer.header("POST", "/internal/ping", {}, b"")
    member[1].write(
        f"POST /internal/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        f"{HEADER_SIGNATURE}: {signature}\r\n\r\n".encode()
    )
    public[1].write(b"GET /sleep?s=0 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await member[0].readuntil(b"pong")).startswith(b"HTTP/1.1 200")
    assert (await public[0].readuntil(b"slept")).startswith(b"HTTP/1.1 200")
    assert served.tracker.members == 1
    (public_s, _), (member_s, _) = await asyncio.gather(
        _closed_after(public[0], 6), _closed_after(member[0], 6)
    )
    assert 0.9 <= public_s <= 2.0 and 2.9 <= member_s <= 4.0, (public_s, member_s)


async def test_at_the_cap_sheds_idle_then_silent_then_partial_then_slow_bodies(serve) -> None:
    served = await serve(cap=5, header_timeout_s=30, idle_timeout_s=30, body_grace_s=30)
    tracker, port = served.tracker, served.port

    async def connect(data: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        conn = await asyncio.open_connection("127.0.0.1", port)
        if data:
            conn[1].write(data)
        await asyncio.sleep(0.1)  # the server has seen its bytes
        return conn

    def running() -> int:
        return sum(
            1
            for conn in tracker.phases[REQUEST]
            if conn.current is not None and conn.current.content.is_eof()
        )

    handler = await connect(b"GET /sleep?s=4 HTTP/1.1\r\nHost: x\r\n\r\n")  # never shed
    idle = await connect(b"GET /sleep?s=0 HTTP/1.1\r\nHost: x\r\n\r\n")
    await idle[0].readuntil(b"slept")
    silent = await connect()
    partial = await connect(b"GET / HTTP/1.1\r\n")
    slow = await connect(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 9999\r\n\r\nx")
    await asyncio.sleep(1.0)  # old enough for its body to count as below the floor
    assert tracker.live == 5
    order, newcomers = [], []
    for _ in range(4):
        before = dict(tracker.closed)
        newcomers.append(await connect(b"GET /sleep?s=4 HTTP/1.1\r\nHost: x\r\n\r\n"))
        order += [r for r, n in tracker.closed.items() if n > before.get(r, 0)]
    assert order == ["shed_idle", "shed_silent", "shed_partial", "shed_slow_body"]
    assert running() == 5
    try:  # nothing may go: the newcomer is reset (at connect, or at its first read)
        refused = await connect(b"GET /sleep?s=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await _closed_after(refused[0], 2))[1] == b""
    except ConnectionResetError:
        pass
    assert tracker.closed["rejected_cap"] == 1
    for victim in (idle, silent, partial, slow):
        assert (await _closed_after(victim[0], 2))[0] < 1
    assert (await handler[0].readuntil(b"slept")).startswith(b"HTTP/1.1 200")


async def test_a_per_peer_cap_applies_to_loopback_only_when_asked(serve) -> None:
    lax = await serve(max_connections_per_peer=2)
    conns = [await asyncio.open_connection("127.0.0.1", lax.port) for _ in range(3)]
    await asyncio.sleep(0.1)
    assert lax.tracker.closed["rejected_peer"] == 0 and lax.tracker.live == 3
    strict = await serve(max_connections_per_peer=2, peer_limit_loopback=True)
    conns += [await asyncio.open_connection("127.0.0.1", strict.port) for _ in range(3)]
    await asyncio.sleep(0.1)
    assert strict.tracker.closed["rejected_peer"] == 1 and strict.tracker.live == 2
    for _, writer in conns:
        writer.close()


def test_the_budget_keeps_a_reserve_below_the_descriptor_limit() -> None:
    settings = ConnectionSettings()
    assert budget(settings, 1024) == Budget(1024, 128, 896)
    assert budget(settings, 20_000) == Budget(20_000, 1024, 18_976)
    assert budget(settings, 256).cap == 192  # the reserve is at least 64
    forced = ConnectionSettings(max_connections=5000, connection_reserve=10)
    assert budget(forced, 1024) == Budget(1024, 10, 5000)  # a cap above the limit: as asked


async def test_a_tls_handshake_that_never_comes_is_cut_and_counted(serve, tmp_path) -> None:
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    from tests.integration.test_tls import make_pki

    pki = make_pki(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["cert"], pki["key"])
    app = new_app(ServerConfig(tls_handshake_timeout_s=1.0))
    runner, port = await start_app(app, "127.0.0.1", 0, ssl_context=context)
    try:
        tracker = app[GUARDS].tracker
        reader, _ = await asyncio.open_connection("127.0.0.1", port)  # TCP, then silence
        seconds, _ = await _closed_after(reader, 5)
        assert 0.9 <= seconds <= 2.0, seconds
        await asyncio.sleep(0.1)
        assert tracker.closed["tls_handshake"] == 1 and tracker.live == 0
        client = ssl.create_default_context(cafile=pki["ca"])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 ")
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_nodes_metrics_include_the_runners_own(tmp_path) -> None:
    from appliance.config import NodeConfig
    from appliance.node.server import build_node_app

    app = build_node_app(NodeConfig(model_repo=str(tmp_path), port=0, intra_op_threads=1))
    runner, port = await start_app(app, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{port}"
        assert await metric_sum(url, "appliance_connections_opened_total") >= 1
        assert await metric_sum(url, "appliance_descriptors", what="cap") > 0
        assert await metric_sum(url, "appliance_admission", what="limit") == 64
    finally:
        await runner.cleanup()
