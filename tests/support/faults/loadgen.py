"""An open-loop load generator, run in a process of its own so its CPU is its own (and reported).

    python -m tests.support.faults.loadgen --url URL --body FILE --header K:V ... \
        --rate 800 --seconds 30 [--timeout 10] [--max-connections 512]
    python -m tests.support.faults.loadgen ... --concurrency 32 --seconds 5   (closed loop)

Request ``i`` is due at ``start + i / rate`` whatever the server does (open loop: a slow server
does not slow the sender, so queueing shows in the latencies); a latency runs from the moment a
request was due, not from when it was sent, so the generator's own lag is counted against the
server rather than hidden. Connections are kept alive and reused; a new one is opened when none
is idle, up to ``--max-connections`` (past it a request waits for one, and that wait counts in
its latency); the connections 20 ms of requests need are opened before the first is due.
Prints one JSON object: answers by status, latencies per second and per status class, requests
that timed out, Retry-After seen on 503s, and this process's CPU seconds.

``--concurrency N`` runs a closed loop instead (N clients, each sending its next request when
its answer came): the throughput it reaches is the capacity the open-loop runs are scaled to.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


@dataclass
class Sample:
    due: float  # seconds from the start of the run
    status: int  # 0: no answer (timeout, reset)
    seconds: float  # from due to the end of the answer
    retry_after: bool = False


@dataclass
class _Pool:
    host: str
    port: int
    limit: int
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    opened: int = 0
    open_now: int = 0
    waiters: int = 0
    freed: asyncio.Event = field(default_factory=asyncio.Event)

    async def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while True:
            while self.idle:
                reader, writer = self.idle.pop()
                if not writer.is_closing() and not reader.at_eof():
                    return reader, writer
                self.open_now -= 1
                writer.close()
            if self.open_now < self.limit:
                self.open_now += 1
                self.opened += 1
                try:
                    return await asyncio.open_connection(self.host, self.port)
                except OSError:
                    self.open_now -= 1
                    raise
            self.freed.clear()
            await self.freed.wait()

    def give(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], keep: bool) -> None:
        if keep:
            self.idle.append(conn)
        else:
            self.open_now -= 1
            conn[1].close()
        self.freed.set()


async def _exchange(
    pool: _Pool, request: bytes, timeout: float
) -> tuple[int, bool]:  # status, Retry-After present
    conn = await pool.take()
    keep = False
    try:
        async with asyncio.timeout(timeout):
            reader, writer = conn
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            await reader.readexactly(int(headers.get("content-length", "0")))
            keep = headers.get("connection", "").lower() != "close"
            return status, "retry-after" in headers
    finally:
        pool.give(conn, keep)


async def run(
    url: str,
    body: bytes,
    headers: dict[str, str],
    rate: float,
    seconds: float,
    timeout: float,
    max_connections: int,
) -> dict[str, object]:
    parts = urlsplit(url)
    pool = _Pool(parts.hostname or "127.0.0.1", parts.port or 80, max_connections)
    request = _request_bytes(parts.path, parts.netloc, body, headers)
    samples: list[Sample] = []
    loop = asyncio.get_running_loop()
    # the connections a steady client population would already hold (20 ms of requests):
    # a run measures a load, not a storm of connects at its first second
    warm = [pool.take() for _ in range(min(max_connections, max(1, int(rate * 0.02))))]
    for conn in await asyncio.gather(*warm):
        pool.give(conn, True)
    started = loop.time()
    total = int(rate * seconds)
    tasks: set[asyncio.Task[None]] = set()
    late = 0.0  # the sender's worst lag behind the schedule

    async def one(due: float) -> None:
        try:
            status, retry = await _exchange(pool, request, timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            status, retry = 0, False
        samples.append(Sample(due, status, loop.time() - started - due, retry))

    for i in range(total):
        due = i / rate
        wait = started + due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        else:
            late = max(late, -wait)
        task = loop.create_task(one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=timeout + 5)
    for _, writer in pool.idle:
        writer.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return summarise(samples, seconds, timeout) | {
        "rate": rate,
        "connections_opened": pool.opened,
        "sender_max_lag_s": round(late, 4),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    }


async def closed_loop(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float, timeout: float
) -> dict[str, object]:
    parts = urlsplit(url)
    pool = _Pool(parts.hostname or "127.0.0.1", parts.port or 80, concurrency)
    request = _request_bytes(parts.path, parts.netloc, body, headers)
    loop = asyncio.get_running_loop()
    started = loop.time()
    samples: list[Sample] = []

    async def client() -> None:
        while (sent_at := loop.time()) - started < seconds:
            try:
                status, retry = await _exchange(pool, request, timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                status, retry = 0, False
            samples.append(Sample(sent_at - started, status, loop.time() - sent_at, retry))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = loop.time() - started
    for _, writer in pool.idle:
        writer.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return summarise(samples, seconds, timeout) | {
        "concurrency": concurrency,
        "ok_per_s": round(sum(s.status == 200 for s in samples) / elapsed, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    }


def _request_bytes(path: str, netloc: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {netloc}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(samples: list[Sample], seconds: float, timeout: float) -> dict[str, object]:
    by_status: dict[str, int] = {}
    for s in samples:
        by_status[str(s.status)] = by_status.get(str(s.status), 0) + 1
    ok = [s.seconds for s in samples if s.status == 200]
    refused = [s for s in samples if s.status == 503]
    per_second, refused_per_second = [], []
    for second in range(int(seconds + 0.999)):
        window = [s for s in samples if second <= s.due < second + 1]
        ok_window = [s.seconds for s in window if s.status == 200]
        per_second.append(round(percentile(ok_window, 0.99) * 1000, 2))
        no_window = [s.seconds for s in window if s.status == 503]
        refused_per_second.append(round(percentile(no_window, 0.99) * 1000, 2))
    # the p99 of every answer from second k on: "back within x after k s" (one second's p99,
    # of a few hundred answers, is its 4th slowest: a single pause anywhere decides it)
    from_second = [
        round(
            percentile([s.seconds for s in samples if s.status == 200 and s.due >= k], 0.99) * 1000,
            2,
        )  # fmt: skip
        for k in range(len(per_second))
    ]
    return {
        "sent": len(samples),
        "statuses": by_status,
        "ok": len(ok),
        "ok_p50_ms": round(percentile(ok, 0.5) * 1000, 2),
        "ok_p99_ms": round(percentile(ok, 0.99) * 1000, 2),
        "refused_p99_ms": round(percentile([s.seconds for s in refused], 0.99) * 1000, 2),
        "refused_with_retry_after": sum(s.retry_after for s in refused),
        "timed_out": sum(1 for s in samples if s.status == 0 and s.seconds >= timeout),
        "no_answer": by_status.get("0", 0),
        "ok_p99_ms_per_second": per_second,
        "refused_p99_ms_per_second": refused_per_second,
        "ok_p99_ms_from_second": from_second,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("--header", action="append", default=[], help="NAME:VALUE")
    parser.add_argument("--rate", type=float, default=0.0, help="requests per second")
    parser.add_argument("--concurrency", type=int, default=0, help="closed loop of N clients")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--timeout", type=float, default=10.0, help="a client's patience")
    parser.add_argument("--max-connections", type=int, default=512)
    args = parser.parse_args(argv)
    headers = dict(h.split(":", 1) for h in args.header)
    body = args.body.read_bytes()
    if args.concurrency:
        result = asyncio.run(
            closed_loop(args.url, body, headers, args.concurrency, args.seconds, args.timeout)
        )
    else:
        result = asyncio.run(
            run(
                args.url, body, headers, args.rate, args.seconds, args.timeout, args.max_connections
            )
        )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
