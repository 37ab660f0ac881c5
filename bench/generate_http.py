"""Side (c) of bench/generate.py: ``appliance serve`` with K local nodes, driven through its
OpenAI-compatible streaming endpoint.

The contract this side is written to: ``POST {url}/v1/completions`` with ``{"model", "prompt",
"max_tokens", "temperature": 0, "stream": true, "ignore_eos": true, "stream_options":
{"include_usage": true}}`` answers 200 ``text/event-stream``: ``data: {json}`` events holding
``choices[0].text`` (OpenAI's ``text_completion`` chunks), a last chunk with ``usage``
(``prompt_tokens``, ``completion_tokens``), then ``data: [DONE]``. Time to first token = the
first chunk with text; decode tokens/s = (completion_tokens - 1) / (last text chunk - first).

A 404 on the route (the endpoint is not there yet) raises ``EndpointMissing``; any other failure
(a status other than 200, not an event stream, an ``error`` event, no ``[DONE]``, no ``usage``)
raises ``EndpointFailed``; either makes the bench skip the side with the message. ``Served``
holds the six rings (fp32, int4 x 1, 2, 3 nodes) for the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.generate_common import PRECISIONS, Prompt, Round, Side, say, unset

ROUTE = "/v1/completions"
MODEL = "smollm2"
SERVE_NODES = (1, 2, 3)
RESUME_SETTLE_S = 0.5
_URL = re.compile(r"https?://[^\s()]+")


class EndpointMissing(RuntimeError):
    """The server has no /v1/completions (404)."""


class EndpointFailed(RuntimeError):
    """The route exists but did not stream a completion as the contract says."""


class SseParser:
    """Server-sent events from bytes as they arrive (any split): each event's data lines,
    joined with newlines as the SSE spec says. Comments (``:``) and other fields are skipped;
    lines end with LF or CRLF."""

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._pending += chunk
        events: list[str] = []
        while True:
            end = self._pending.find(b"\n")
            if end < 0:
                return events
            raw, self._pending = self._pending[:end], self._pending[end + 1 :]
            line = raw.rstrip(b"\r").decode("utf-8")
            if not line:  # a blank line ends the event
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if field == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)

    def close(self) -> list[str]:
        """An event left without its blank line when the stream ended."""
        events = self.feed(b"\n\n") if self._pending or self._data else []
        return events


def completion_payload(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


async def stream_completion(
    session: Any, url: str, model: str, prompt: str, max_tokens: int
) -> Round:
    """One streamed completion; its timings, token counts and this process's CPU."""
    import aiohttp

    cpu = time.process_time()
    started = time.perf_counter()
    first = last = None
    pieces: list[str] = []
    usage: dict[str, Any] | None = None
    finish = None
    chunks = 0
    done = False
    target = url.rstrip("/") + ROUTE
    try:
        async with session.post(target, json=completion_payload(model, prompt, max_tokens)) as r:
            if r.status == 404:
                body = (await r.text())[:300]
                raise EndpointMissing(f"POST {target} answered 404 (no such route yet): {body}")
            if r.status != 200:
                body = (await r.text())[:500]
                raise EndpointFailed(f"POST {target} answered {r.status}: {body}")
            kind = r.headers.get("Content-Type", "")
            if not kind.startswith("text/event-stream"):
                body = (await r.text())[:300]
                raise EndpointFailed(
                    f"POST {target} answered {kind!r}, not an event stream: {body}"
                )
            parser = SseParser()
            async for data in r.content.iter_any():
                now = time.perf_counter()
                for event in parser.feed(data):
                    if event == "[DONE]":
                        done = True
                        break
                    chunk = _chunk(event, target)
                    chunks += 1
                    for choice in chunk.get("choices") or []:
                        text = choice.get("text") or ""
                        if text:
                            first = now if first is None else first
                            last = now
                            pieces.append(text)
                        finish = choice.get("finish_reason") or finish
                    usage = chunk.get("usage") or usage
                if done:
                    break
    except aiohttp.ClientError as exc:
        raise EndpointFailed(f"POST {target} failed: {exc!r}") from exc
    if not done:
        raise EndpointFailed(f"POST {target}: the stream ended without data: [DONE]")
    if usage is None or not isinstance(usage.get("completion_tokens"), int):
        raise EndpointFailed(
            f"POST {target}: no usage chunk with completion_tokens (stream_options.include_usage "
            "was sent)"
        )
    if first is None or last is None:
        raise EndpointFailed(f"POST {target}: {chunks} chunk(s) and none held text")
    return Round(
        first - started,
        last - first,
        [],
        count=int(usage["completion_tokens"]),
        cpu_s=time.process_time() - cpu,
        extra={
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage["completion_tokens"],
            "chunks": chunks,
            "finish_reason": finish,
            "text": "".join(pieces),
        },
    )


def _chunk(event: str, target: str) -> dict[str, Any]:
    try:
        chunk = json.loads(event)
    except json.JSONDecodeError as exc:
        raise EndpointFailed(f"POST {target}: an event is not JSON: {event[:200]!r}") from exc
    if not isinstance(chunk, dict):
        raise EndpointFailed(f"POST {target}: an event is not a JSON object: {event[:200]!r}")
    if "error" in chunk:
        raise EndpointFailed(f"POST {target}: the stream sent an error: {chunk['error']}")
    return chunk


class ServeProcess:
    """``appliance serve --nodes K --stages K`` on 127.0.0.1, port chosen by the OS; its URL is
    read from the one ``listening on`` line it prints once the model is placed."""

    def __init__(
        self,
        repo: Path,
        model: str,
        nodes: int,
        state_dir: Path,
        log: Path,
        pausable: bool = True,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        # pausable: the bench stops (SIGSTOP) a server while other sides run, so its idle
        # heartbeats do not load the cores; no node may then count as lost when it resumes
        keep = ["--node-timeout-s", "86400", "--replace-after-s", "0"] if pausable else []
        self.command = [
            sys.executable,
            "-m",
            "appliance.cli",
            "serve",
            "--nodes",
            str(nodes),
            "--stages",
            str(nodes),
            "--model-repo",
            str(repo),
            "--models",
            model,
            "--port",
            "0",
            "--state-dir",
            str(state_dir),
            "--no-cache-enabled",  # a greedy answer must be computed, never replayed
            "--log-level",
            "warning",
            *keep,
            *extra_args,
        ]
        self.paused = False
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = log.open("w")
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url: str | None = None

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_listening(self, timeout_s: float) -> str:
        """The URL, or RuntimeError with the log's tail when it exits or takes too long."""
        end = time.monotonic() + timeout_s
        while self.url is None:
            left = end - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.05, left)) if left > 0 else None
            except queue.Empty:
                line = None
            if line is None:
                why = (
                    f"exited with rc {self.process.poll()}"
                    if self.process.poll() is not None
                    else f"printed no listening line within {timeout_s:.0f}s"
                )
                tail = self.log.read_text(errors="replace")[-1500:].strip()
                raise RuntimeError(f"appliance serve {why}; its log ({self.log}) ends:\n{tail}")
            match = _URL.search(line) if "listening on" in line else None
            if match:
                self.url = match.group(0)
        return self.url

    def _members(self) -> list[Any]:
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def pause(self) -> None:
        """SIGSTOP the coordinator and its nodes (they use no CPU until ``resume``)."""
        import psutil

        for member in self._members():
            with contextlib.suppress(psutil.Error):
                member.suspend()
        self.paused = True

    def resume(self) -> None:
        import psutil

        for member in self._members():
            with contextlib.suppress(psutil.Error):
                member.resume()
        self.paused = False

    def cpu_s(self) -> float:
        """CPU seconds so far of the coordinator and its node processes."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            members = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0.0
        total = 0.0
        for member in members:
            try:
                times = member.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
        return total

    def stop(self) -> None:
        import psutil

        if self.paused:
            self.resume()  # a stopped process would hold its SIGTERM
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            children = []
        if self.process.poll() is None:
            self.process.terminate()  # serve stops its nodes first, then itself
            try:
                self.process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for child in children:  # nodes left behind by a serve that had to be killed
            try:
                child.wait(timeout=5)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.Error:
                pass
        self._stderr.close()


class Served:
    """Side (c): the servers, one asyncio loop and one client session for all rounds."""

    def __init__(self, work: Path, timeout_s: float, pause_idle: bool) -> None:
        self.work = work
        self.timeout_s = timeout_s
        self.pause_idle = pause_idle
        self.loop = asyncio.Runner()
        self.client: Any = None
        self.servers: list[Any] = []

    def _client(self) -> Any:
        import aiohttp

        async def make() -> Any:
            timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
            return aiohttp.ClientSession(timeout=timeout)

        if self.client is None:
            self.client = self.loop.run(make())
        return self.client

    def sides(self, probe: Prompt) -> list[Side]:
        """One side per (precision, nodes). The first ring starts alone: where it has no
        route (or fails), the others would fail alike and are not started; the others then
        start together and each is probed with a 2-token completion."""
        from bench.generate_inproc import ensure_package

        configs = [(p, k) for p in PRECISIONS for k in SERVE_NODES]
        sides = [
            Side(
                "c",
                f"serve-{k}node-{p}",
                f"(c) appliance serve, {k} node{'s' * (k > 1)}",
                p,
                unset,
            )
            for p, k in configs
        ]
        repos = {p: ensure_package(self.work, p, say) for p in PRECISIONS}
        servers = [self._start(repos[p], p, k) for p, k in configs[:1]]
        if not self._ready(sides[0], servers[0], probe):
            for side in sides[1:]:
                side.skipped = "not tried: the first configuration (fp32, 1 node) failed"
            return sides
        servers += [self._start(repos[p], p, k) for p, k in configs[1:]]
        for side, server in zip(sides[1:], servers[1:], strict=True):
            self._ready(side, server, probe)
        return sides

    def _start(self, repo: Path, precision: str, nodes: int) -> Any:
        name = f"serve-{precision}-{nodes}"
        say(f"starting appliance serve --nodes {nodes} --stages {nodes} ({precision})")
        server = ServeProcess(
            repo,
            MODEL,
            nodes,
            self.work / name,
            self.work / "logs" / f"{name}.log",
            pausable=self.pause_idle,
        )
        self.servers.append(server)
        return server

    def _ready(self, side: Side, server: Any, probe: Prompt) -> bool:
        nodes = int(server.command[server.command.index("--nodes") + 1])
        try:
            url = server.wait_listening(self.timeout_s)
            side.run = self._runner(server, url)
            side.run(probe, 2)  # the probe: does the route stream a completion?
        except (EndpointMissing, EndpointFailed, RuntimeError) as exc:
            side.skipped = str(exc)
            server.stop()
            return False
        cores = os.cpu_count() or 1
        side.settings = {
            "command": server.command,
            "url": url,
            "onnxruntime_threads_per_node": max(1, cores // nodes),
            "onnxruntime_threads_total": max(1, cores // nodes) * nodes,
            "paused_while_other_sides_run": self.pause_idle,
        }
        side.close = server.stop
        return True

    def _runner(self, server: Any, url: str) -> Callable[[Prompt, int], Round]:
        def run(prompt: Prompt, n: int) -> Round:
            if server.paused:
                server.resume()
                time.sleep(RESUME_SETTLE_S)  # timers due while stopped fire now, not in the round
            try:
                before = server.cpu_s()
                result = self.loop.run(
                    stream_completion(self._client(), url, MODEL, prompt.text, n)
                )
                result.extra["server_cpu_s"] = round(server.cpu_s() - before, 3)
            finally:
                if self.pause_idle:
                    server.pause()
            if result.extra.get("prompt_tokens") not in (None, prompt.tokens):
                result.extra["prompt_tokens_mismatch"] = True
            return result

        return run

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        if self.client is not None:
            self.loop.run(self.client.close())
        self.loop.close()
