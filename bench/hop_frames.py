"""What a persistent framed hop connection would save over an HTTP request per hop, priced.

    python -m bench.hop_frames                       # 4 KB and 400 KB hops, concurrency 32
    python -m bench.hop_frames --sizes 4096 --rounds 7 --hops 4000

Hops today are HTTP/1.1 POSTs on pooled keep-alive connections (``HopTransport``, the lean
client) to the member's aiohttp server. The lever priced here replaces them with one
connection per peer carrying length-prefixed frames, several hops in flight on it at once and
answered in any order. Both sides are run against a server process holding both kinds of
listener, doing the same nothing with each hop (the answer is the body, echoed), in
alternating rounds: the client's and the server's CPU per hop, and hops/s. Their difference
is the most such a connection could save per hop, to set against what a hop costs a node
today (its Python holds the GIL 0.70 ms per one-row MLP request, docs/profile.md). Signing,
auth and deadlines are left out of both sides: a framed hop would still sign every body.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from appliance.ring.hop_transport import HopTransport
from bench.report import save_report

FRAME = struct.Struct("!IQ")  # payload length, hop id
CONCURRENCY = 32
Post = Callable[[bytes], Awaitable[bytes | bytearray]]  # one hop: body in, body back


async def _echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read(), content_type="application/octet-stream")


class FrameProtocol(asyncio.BufferedProtocol):
    """Length-prefixed frames read straight into a buffer of each frame's size (no copy of a
    body, and no memmove of the frames behind it, which a StreamReader pays when several hops
    wait on one connection: 400 KB hops cost 1.4x the HTTP side's CPU through one)."""

    def __init__(self, on_frame: Callable[[FrameProtocol, int, bytearray], None]) -> None:
        self.on_frame = on_frame
        self.transport: asyncio.Transport | None = None
        self._head = bytearray(FRAME.size)
        self._buffer = self._head
        self._filled = 0
        self._hop = -1  # -1: reading a head
        self.closed = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        while self._filled == len(self._buffer):
            if self._hop < 0:
                length, self._hop = FRAME.unpack(self._head)
                self._buffer, self._filled = bytearray(length), 0
                if length:
                    return
            body, hop = self._buffer, self._hop
            self._buffer, self._filled, self._hop = self._head, 0, -1
            self.on_frame(self, hop, body)

    def send(self, hop: int, body: bytes | bytearray) -> None:
        assert self.transport is not None
        self.transport.writelines((FRAME.pack(len(body), hop), body))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _echo_frame(protocol: FrameProtocol, hop: int, body: bytearray) -> None:
    """Each hop handled in its own task, as aiohttp does (a real handler awaits a run)."""

    async def answer() -> None:
        protocol.send(hop, body)

    task = asyncio.get_running_loop().create_task(answer())
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


_TASKS: set[asyncio.Task[None]] = set()


async def serve() -> None:
    """The server process: an aiohttp app and a framed listener on loopback, ports on stdout."""
    app = web.Application(client_max_size=1 << 26)
    app.router.add_post("/hop", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    http_port = runner.addresses[0][1]
    loop = asyncio.get_running_loop()
    framed = await loop.create_server(lambda: FrameProtocol(_echo_frame), "127.0.0.1", 0)
    framed_port = framed.sockets[0].getsockname()[1]
    print(http_port, framed_port, flush=True)
    await asyncio.Event().wait()


class FramedClient:
    """One connection, hops multiplexed on it by id: what the lever would build."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[bytearray]] = {}
        self.next_id = 0
        self.protocol: FrameProtocol | None = None

    async def connect(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        _, self.protocol = await loop.create_connection(
            lambda: FrameProtocol(self._answered), "127.0.0.1", port
        )

    def _answered(self, protocol: FrameProtocol, hop: int, body: bytearray) -> None:
        self.waiting.pop(hop).set_result(body)

    async def post(self, body: bytes) -> bytearray:
        assert self.protocol is not None
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.waiting[self.next_id] = future
        self.protocol.send(self.next_id, body)
        return await future

    async def close(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()


async def _drive(post: Post, body: bytes, hops: int) -> None:
    left = hops

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            answer = await post(body)
            if len(answer) != len(body):
                raise RuntimeError(f"a hop came back with {len(answer)} bytes, not {len(body)}")

    await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))


async def _one(post: Post, server: psutil.Process, body: bytes, hops: int) -> dict[str, float]:
    server_cpu = sum(server.cpu_times()[:2])
    client_cpu = time.process_time()
    started = time.perf_counter()
    await _drive(post, body, hops)
    wall = time.perf_counter() - started
    return {
        "hops_s": hops / wall,
        "client_us": (time.process_time() - client_cpu) / hops * 1e6,
        "server_us": (sum(server.cpu_times()[:2]) - server_cpu) / hops * 1e6,
    }


async def measure(sizes: list[int], rounds: int, hops: int) -> dict[str, Any]:
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.hop_frames", "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        http_port, framed_port = (int(p) for p in server.stdout.readline().split())
        process = psutil.Process(server.pid)
        transport = HopTransport()
        url = f"http://127.0.0.1:{http_port}/hop"
        headers = {"Content-Type": "application/octet-stream"}

        async def http(body: bytes) -> bytes:
            return (await transport.post(url, headers, body, 30.0)).body

        framed = FramedClient()
        await framed.connect(framed_port)
        sides: dict[str, Post] = {"http": http, "framed": framed.post}
        results: dict[str, Any] = {}
        for size in sizes:
            body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            for post in sides.values():  # warm: connections, buffers
                await _drive(post, body, CONCURRENCY * 4)
            per_round: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
            for index in range(rounds):
                order = list(sides) if index % 2 == 0 else list(reversed(sides))
                for side in order:
                    figures = await _one(sides[side], process, body, hops)
                    figures["p50_us_alone"] = await _latency_us(sides[side], body, hops // 10)
                    per_round[side].append(figures)
                print(f"  {size} bytes, round {index + 1}/{rounds}: " + ", ".join(
                    f"{side} {r[-1]['client_us'] + r[-1]['server_us']:.0f} us"
                    for side, r in per_round.items()), flush=True)  # fmt: skip
            results[str(size)] = _summary(per_round)
        await framed.close()
        await transport.close()
    finally:
        server.kill()
        server.wait()
    return {"bench": "hop_frames", "concurrency": CONCURRENCY, "rounds": rounds, "hops": hops,
            "sizes": results}  # fmt: skip


async def _latency_us(post: Post, body: bytes,
                      hops: int) -> float:  # fmt: skip
    """p50 round trip of one hop at a time (concurrency 1), microseconds."""
    times = []
    for _ in range(hops):
        started = time.perf_counter()
        await post(body)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def _summary(per_round: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    median = {
        side: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for side, runs in per_round.items()
    }
    totals = {side: [r["client_us"] + r["server_us"] for r in runs]
              for side, runs in per_round.items()}  # fmt: skip
    saved = [h - f for h, f in zip(totals["http"], totals["framed"], strict=True)]
    return {
        "per_round": per_round,
        "median": median,
        "cpu_us_per_hop": {side: statistics.median(v) for side, v in totals.items()},
        "framed_saves_us_per_hop": statistics.median(saved),
        "hops_s_ratio": statistics.median(
            f["hops_s"] / h["hops_s"]
            for h, f in zip(per_round["http"], per_round["framed"], strict=True)
        ),
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"CPU per hop (client + server) at concurrency {report['concurrency']}, and a hop's "
          f"round trip alone, median of {report['rounds']} alternating rounds:")  # fmt: skip
    print(f"  {'size':>9} {'side':<8} {'hops/s':>8} {'client us':>10} {'server us':>10} "
          f"{'p50 us alone':>13}")  # fmt: skip
    for size, summary in report["sizes"].items():
        for side, m in summary["median"].items():
            print(f"  {size:>9} {side:<8} {m['hops_s']:8.0f} {m['client_us']:10.1f} "
                  f"{m['server_us']:10.1f} {m['p50_us_alone']:13.1f}")  # fmt: skip
        print(f"  {size:>9} framed saves {summary['framed_saves_us_per_hop']:.1f} us of CPU a "
              f"hop; hops/s x{summary['hops_s_ratio']:.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="4096,409600", help="hop body bytes, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hops", type=int, default=5000, help="hops per side a round")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve())
        return 0
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes takes byte counts separated by commas, got {args.sizes!r}")
    if args.rounds < 1 or args.hops < CONCURRENCY or any(s < 1 for s in sizes):
        parser.error(f"--rounds must be at least 1, --hops at least {CONCURRENCY}, sizes above 0")
    report = asyncio.run(measure(sizes, args.rounds, args.hops))
    print_report(report)
    save_report(report, args.out, "hop-frames")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
