"""Generation streams through a node killed (SIGKILL) or frozen (SIGSTOP) mid-answer: SmolLM2 in
2 spans x 2 replicas on four node processes, greedy streams at once with the cache bypassed.

The streams run once undisturbed, then again with a node that reports a live sequence killed
once every stream has a token, then again with a node of the other span frozen (it never
answers: ``step_timeout_s`` catches it). A stream counts as failed if it ends in an error or
its tokens differ from the undisturbed run's other than at a fp32 near-tie (top-1 / top-2 logit
gap under 2e-3, checked in process: the replay is a prefill, not step-by-step decode).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openai

from exporter.decoder_verify import DecoderChain, teacher_force
from runtime.decoder_load import load_decoder_span
from runtime.package import open_package
from runtime.session import SessionSettings
from runtime.text import PackageText
from tests.support.faults.common import FaultRecord, metric_sum, timed
from tests.support.harness import Ring, http
from tests.support.smollm2 import NAME, smollm2_export, smollm2_repo
from tests.support.streams import Stream, streams_at_once

NEAR_TIE = 2e-3
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colours are",
    "Water boils at a temperature of",
    "My favourite way to spend a Sunday is",
    "The quick brown fox",
    "In 1969, the first people to walk on the Moon",
]


def run_streams(
    ring: Ring, prompts: list[str], tokens: int, fault: Callable[[], None] | None = None
) -> list[Stream]:
    """The streams at once against ``ring``; ``fault`` runs once every stream has a token."""
    client = openai.OpenAI(base_url=ring.url + "/v1", api_key="none", max_retries=0, timeout=300)
    return streams_at_once(client, NAME, prompts, tokens, fault)


def busy_node(ring: Ring, among: set[str]) -> str:
    """A node of ``among`` whose heartbeat reports at least one live sequence."""
    end = time.monotonic() + 10
    while time.monotonic() < end:
        _, view = http("GET", ring.url + "/v2/cluster")
        for node in view["nodes"]:
            if node["node_id"] in among and node["load"].get("sequences", 0) >= 1:
                return str(node["node_id"])
        time.sleep(0.05)
    raise AssertionError(f"none of {sorted(among)} reported a live sequence")


class TokenCheck:
    """Compares a stream's tokens with the undisturbed run's; an in-process chain of SmolLM2
    (loaded only when two differ) says whether the first difference is a near-tie."""

    def __init__(self) -> None:
        export = smollm2_export()
        assert export.folder is not None and export.generation is not None
        info = export.generation
        self.stages = export.default_stages
        self.text = PackageText.open(export.folder, info.tokenizer, info.chat_template,
                                     info.bos_token_id, info.eos_token_ids)  # fmt: skip
        self._chain: DecoderChain | None = None

    def near_tie_or_equal(self, ours: Stream, reference: Stream) -> tuple[bool, bool]:
        """(acceptable, a near-tie was hit)."""
        if ours.error or len(ours.ids) != len(reference.ids):
            return False, False
        pairs = enumerate(zip(ours.ids, reference.ids, strict=True))
        split = next((i for i, (a, b) in pairs if a != b), None)
        if split is None:
            return True, False
        if self._chain is None:
            package = open_package(smollm2_repo(), NAME)
            settings = SessionSettings(device="cpu", intra_op_threads=2)
            spans = [load_decoder_span(package, settings, a, b) for a, b in self.stages]
            self._chain = DecoderChain(spans)
        prompt = self.text.encode(ours.prompt)
        logits = teacher_force(self._chain, prompt, reference.ids[: split + 1])
        top2 = np.sort(logits[split])[-2:]
        return bool(top2[1] - top2[0] < NEAR_TIE), True


def _record(
    label: str, load: str, streams: list[Stream], reference: list[Stream], check: TokenCheck
) -> FaultRecord:
    record = FaultRecord(label, load, group="generation")
    record.sent = len(streams)
    verdicts = [check.near_tie_or_equal(s, r) for s, r in zip(streams, reference, strict=True)]
    record.failed = sum(not ok for ok, _ in verdicts)
    record.status_5xx = sum(bool(s.error) for s in streams)
    record.details = {
        "near_ties": sum(tie for _, tie in verdicts),
        "largest_gap_s": round(max(s.largest_gap_s for s in streams), 2),
        "errors": [s.error for s in streams if s.error],
    }
    return record


def generation_failover(
    work: Path,
    streams: int = 8,
    tokens: int = 24,
    step_timeout_s: float = 2.0,
    in_process: bool = False,
) -> list[FaultRecord]:
    """The kill and the freeze, each against the undisturbed run of the same streams.
    ``in_process``: the coordinator is ``appliance serve --in-process-node`` (its node
    ``local-0`` one of the four); the kill takes the other replica of local-0's span, the
    freeze a node of the other span."""
    repo = work / "repo"
    repo.mkdir(parents=True)
    (repo / NAME).symlink_to(smollm2_repo() / NAME)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
    load = f"{streams} greedy streams x {tokens} tokens; 4 nodes, 2 spans x 2 replicas"
    if in_process:
        load += "; the coordinator's process holds one node"
    check = TokenCheck()
    ring = Ring(work, repo)
    records = []
    try:
        if in_process:
            ring.start_serve_in_process("--step-timeout-s", str(step_timeout_s))
        else:
            ring.start_coordinator("--step-timeout-s", str(step_timeout_s))
        for node in "bcd" if in_process else "abcd":
            ring.start_node(node)
        ring.wait_members(4)
        ring.load(NAME, 2, 2)
        ring.wait_ready()
        reference = run_streams(ring, prompts, tokens)
        assert not [s.error for s in reference if s.error], reference
        _, view = http("GET", ring.url + "/v2/cluster")
        spans = [set(s["replicas"]) for s in view["placements"][NAME]["spans"]]
        for how in ("kill", "freeze"):
            label = "node kill -9 mid-stream"
            if how == "freeze":
                label = f"node hung mid-stream (SIGSTOP; step_timeout_s {step_timeout_s:g})"
            # the freeze takes a node of a span that still has both replicas
            among = set(ring.nodes) if how == "kill" else next(
                s for s in spans if all(n in ring.nodes and ring.nodes[n].poll() is None for n in s)
            )  # fmt: skip
            if in_process and how == "kill":  # local-0's span keeps one replica: local-0
                among = next(s for s in spans if "local-0" in s) - {"local-0"}
            victim: list[str] = []
            replays = metric_sum(ring.url, "appliance_generation_replays_total")
            replay_s = metric_sum(ring.url, "appliance_generation_replay_seconds_sum")

            def fault(among: set[str] = among, how: str = how, victim: list[str] = victim) -> None:
                victim.append(busy_node(ring, among))
                ring.kill(victim[0], signal.SIGKILL if how == "kill" else signal.SIGSTOP)

            record = FaultRecord(label, load)
            with timed(record):
                try:
                    disturbed = run_streams(ring, prompts, tokens, fault)
                finally:
                    if victim and how == "freeze":
                        ring.kill(victim[0], signal.SIGCONT)
            seconds = record.seconds
            record = _record(label, load, disturbed, reference, check)
            record.seconds = seconds
            count = metric_sum(ring.url, "appliance_generation_replays_total") - replays
            took = metric_sum(ring.url, "appliance_generation_replay_seconds_sum") - replay_s
            mean = round(took / count, 2) if count else None
            record.details |= {"victim": victim[0], "replays": int(count), "replay_s_mean": mean}
            record.outcome = (
                f"{victim[0]} {'killed' if how == 'kill' else 'frozen'} once every stream had a "
                f"token: {int(count)} sequence(s) replayed elsewhere, "
                f"{took / max(count, 1):.2f} s each on average; the longest pause between two "
                f"tokens {record.details['largest_gap_s']:.2f} s; "
                f"{record.details['near_ties']} stream(s) reached a near-tie"
            )
            records.append(record)
            if how == "kill":
                ring.nodes.pop(victim[0]).wait(timeout=10)
        if in_process:  # how many ring calls were function calls, not HTTP
            calls = metric_sum(ring.url, "appliance_in_process_calls_total")
            for record in records:
                record.details["in_process_calls"] = int(calls)
    finally:
        ring.stop()
    return records


def _stalled_socket(url: str, body: dict[str, object]) -> socket.socket:
    """A streamed completion asked over a socket with a small receive buffer, never read."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def stalled_stream(work: Path, tokens: int = 400, write_timeout_s: float = 2.0) -> FaultRecord:
    """A stream whose client stops reading, beside a stream read as it comes: the stalled one
    is ended within stream_write_timeout_s once its buffer is full, its KV freed on every span,
    and the other's inter-token p99 compared with the same stream alone (tiny Llama, 2 spans
    on 2 node processes)."""
    from tests.support.tiny_llm import shared_tiny_package

    model = "tiny-llm"
    repo = work / "repo"
    repo.mkdir(parents=True)
    (repo / model).symlink_to(shared_tiny_package() / model)
    record = FaultRecord(
        "a stream its client stops reading",
        f"{tokens} tokens streamed beside it; 2 nodes, 2 spans; stream_write_timeout_s "
        f"{write_timeout_s:g}, stream_buffer_bytes 8192",
        group="generation",
    )
    body = {"model": model, "prompt": "a", "max_tokens": tokens, "ignore_eos": True,
            "stream": True}  # fmt: skip
    ring = Ring(work, repo)
    with timed(record):
        try:
            ring.start_coordinator("--stream-write-timeout-s", str(write_timeout_s),
                                   "--stream-buffer-bytes", "8192")  # fmt: skip
            for node in "ab":
                ring.start_node(node)
            ring.wait_members(2)
            ring.load(model, 2, 1)
            ring.wait_ready()
            client = openai.OpenAI(base_url=ring.url + "/v1", api_key="-", max_retries=0)

            def gaps() -> list[float]:
                times = [time.perf_counter() for _ in client.completions.create(
                    model=model, prompt="a", max_tokens=tokens, stream=True,
                    extra_body={"ignore_eos": True})]  # fmt: skip
                return list(np.diff(times))

            alone = gaps()
            beside: list[float] = []
            sock = _stalled_socket(ring.url, body)
            asked = time.monotonic()
            reader = threading.Thread(target=lambda: beside.extend(gaps()))
            reader.start()
            ended_s = None
            while time.monotonic() - asked < 60:
                if metric_sum(ring.url, "appliance_generation_stalled_streams_total") >= 1:
                    ended_s = time.monotonic() - asked
                    break
                time.sleep(0.05)
            reader.join(timeout=120)
            time.sleep(1.0)  # a heartbeat or two
            _, view = http("GET", ring.url + "/v2/cluster")
            kv_left = sum(n["load"].get("kv_reserved_bytes", 0) for n in view["nodes"])
            sock.close()
        finally:
            ring.stop()
    p99 = [float(np.percentile(g, 99)) * 1000 if g else float("nan") for g in (alone, beside)]
    record.sent = 2
    record.failed = int(ended_s is None or kv_left != 0) + int(len(beside) != len(alone))
    record.details = {"ended_s": ended_s, "kv_left_bytes": kv_left, "p99_alone_ms": p99[0],
                      "p99_beside_ms": p99[1]}  # fmt: skip
    record.outcome = (
        (f"ended {ended_s:.1f} s after it was asked (the buffer filled, then "
         f"{write_timeout_s:g} s without a read)" if ended_s is not None else "never ended")
        + f"; KV left on the nodes after: {kv_left} bytes; the other stream's inter-token p99 "
        f"{p99[0]:.1f} ms alone, {p99[1]:.1f} ms beside it"
    )  # fmt: skip
    return record
