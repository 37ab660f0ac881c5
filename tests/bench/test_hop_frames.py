"""bench.hop_frames: its framed connection carries hops whole and in order of id, whatever the
reads cut them into, and the report prices both sides against a real server process."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from bench import hop_frames


async def _framed_server() -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: hop_frames.FrameProtocol(hop_frames._echo_frame), "127.0.0.1", 0
    )
    return server, server.sockets[0].getsockname()[1]


async def test_hops_in_flight_together_each_get_their_own_body_back() -> None:
    server, port = await _framed_server()
    client = hop_frames.FramedClient()
    await client.connect(port)
    try:
        bodies = [bytes([i % 251]) * (i * 997) for i in range(40)]  # 0 bytes up to ~39 KB
        answers = await asyncio.wait_for(
            asyncio.gather(*(client.post(body) for body in bodies)), 10
        )
        assert [bytes(a) for a in answers] == bodies
        assert client.waiting == {}
    finally:
        await client.close()
        server.close()


async def test_a_frame_split_across_reads_and_an_empty_frame_arrive_whole() -> None:
    server, port = await _framed_server()
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    try:
        body = b"0123456789" * 1000
        wire = (
            hop_frames.FRAME.pack(len(body), 7) + body + hop_frames.FRAME.pack(0, 8)  # empty hop
        )
        for start in range(0, len(wire), 333):  # a head cut in two, bodies cut anywhere
            await loop.sock_sendall(sock, wire[start : start + 333])
            await asyncio.sleep(0)
        expected = len(wire)
        got = bytearray()
        while len(got) < expected:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
            assert chunk, "the server closed the connection"
            got += chunk
        assert bytes(got) == wire  # echoed in order: hop 7 with its body, then hop 8 empty
    finally:
        sock.close()
        server.close()


def test_the_report_prices_both_sides_and_is_written(tmp_path: Path, capsys) -> None:
    out = tmp_path / "frames.json"
    argv = ["--sizes", "1024", "--rounds", "1", "--hops", "320", "--out", str(out)]
    assert hop_frames.main(argv) == 0
    summary = json.loads(out.read_text())["sizes"]["1024"]
    for side in ("http", "framed"):
        figures = summary["median"][side]
        assert figures["hops_s"] > 0 and figures["client_us"] > 0 and figures["p50_us_alone"] > 0
        assert summary["cpu_us_per_hop"][side] > 0
    assert "framed saves" in capsys.readouterr().out
