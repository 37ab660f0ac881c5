"""A flood of incomplete connections, in a process of its own (its descriptors are its own):

    python -m tests.support.faults.flood --port P --connections 3000 --seconds 20 \
        [--mode body|partial|silent] [--sources 8] [--no-reconnect]

Each connection sends what the issue's attacker sent, then nothing: ``body`` the headers of a
POST with a 100 KB body and one byte of it; ``partial`` half a request line; ``silent`` nothing.
A connection the server ends is opened again (unless ``--no-reconnect``), so the pressure holds
for ``--seconds``; source addresses rotate over 127.0.0.2.. (``--sources``) so that 20,000
connections do not run out of ports. Prints one JSON object: connections opened, ended by the
server, connect errors, most held at once, this process's CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

PAYLOADS = {
    "body": b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: target\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 102400\r\n\r\nx",
    "partial": b"POST /v2/models/de",
    "silent": b"",
}


class Flood:
    def __init__(self, host: str, port: int, mode: str, sources: int) -> None:
        self.host = host
        self.port = port
        self.payload = PAYLOADS[mode]
        self.sources = [f"127.0.0.{2 + i}" for i in range(sources)] if sources else []
        self.opened = 0
        self.ended_by_server = 0
        self.connect_errors = 0
        self.holding = 0
        self.most_held = 0

    async def hold_one(self, index: int, until: float, reconnect: bool) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            source = (self.sources[index % len(self.sources)], 0) if self.sources else None
            try:
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, local_addr=source
                )
            except OSError:
                self.connect_errors += 1
                await asyncio.sleep(0.05)
                continue
            self.opened += 1
            self.holding += 1
            self.most_held = max(self.most_held, self.holding)
            try:
                if self.payload:
                    writer.write(self.payload)
                async with asyncio.timeout(max(0.0, until - loop.time())):
                    while await reader.read(65536):
                        pass  # a 408 or nothing: either way the server is ending it
                self.ended_by_server += 1
            except (TimeoutError, OSError):
                if loop.time() < until:
                    self.ended_by_server += 1  # reset by the server
            finally:
                self.holding -= 1
                writer.transport.abort()
            if not reconnect:
                return
            await asyncio.sleep(0.01)


async def run(args: argparse.Namespace) -> dict[str, object]:
    flood = Flood(args.host, args.port, args.mode, args.sources)
    loop = asyncio.get_running_loop()
    until = loop.time() + args.seconds
    tasks = []
    for index in range(args.connections):
        tasks.append(loop.create_task(flood.hold_one(index, until, not args.no_reconnect)))
        if index % 200 == 199:
            await asyncio.sleep(0.01)  # a ramp of a few tenths of a second, not one burst
    await asyncio.gather(*tasks)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "connections": args.connections,
        "opened": flood.opened,
        "ended_by_server": flood.ended_by_server,
        "connect_errors": flood.connect_errors,
        "most_held": flood.most_held,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--mode", choices=sorted(PAYLOADS), default="body")
    parser.add_argument("--sources", type=int, default=8, help="127.0.0.x addresses to use")
    parser.add_argument("--no-reconnect", action="store_true")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    result = asyncio.run(run(args))
    result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
