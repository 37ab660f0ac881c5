"""bench/suite.py's points carry the CPU the load generator and the server spent, measured
against a real aiohttp server in a subprocess that burns CPU on every request."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from bench.suite import _measure

_SERVER = textwrap.dedent(
    """
    import sys, time
    from aiohttp import web

    async def handle(request):
        await request.read()
        end = time.process_time() + 0.002  # 2 ms of CPU per request
        while time.process_time() < end:
            pass
        return web.Response(body=b"ok")

    app = web.Application()
    app.router.add_post("/infer", handle)
    runner = web.AppRunner(app)

    async def main():
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(f"http://127.0.0.1:{port}/infer", flush=True)
        while True:
            await __import__("asyncio").sleep(3600)

    __import__("asyncio").run(main())
    """
)


def test_a_point_reports_the_generator_and_server_cores() -> None:
    server = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        row = _measure(url, b"x" * 64, {}, 4, 1.0)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert row["failures"] == 0 and row["throughput_rps"] > 20
    # the server burns 2 ms a request: at least that much CPU over the point, warm-up included
    assert row["server_cores"] >= 0.5 * row["throughput_rps"] * 0.002
    assert 0 < row["generator_cores"] < 1.5
