"""What every fault scenario uses: the small demo model and its reference answers, one record
of counts per fault, requests and bounded loads from threads, and rings on loopback."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any, Self

import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from exporter.demo_model import build_demo_model
from exporter.export import export_model
from runtime.codec import decode_response, encode_request
from tests.support.harness import Ring, http

HEADER = "Inference-Header-Content-Length"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}  # the ring, not the result cache, answers
SMALL = {"blocks": 6, "hidden": 64, "heads": 4, "ffn": 256, "vocab": 300}
ROOT = Path(__file__).resolve().parents[3]
DOCS = ROOT / "docs"


# --- the model and its reference answers ---------------------------------------------------


def make_repo(repo: Path, seed: int = 0, name: str = "demo") -> Path:
    """A repository holding the small demo model (seed 1 gives other bytes, same signature)."""
    model = build_demo_model(**SMALL, seed=seed)
    export_model(model, repo, name, min_segment_bytes=0, source_label="test")
    return repo


@functools.cache
def _reference_session(seed: int) -> ort.InferenceSession:
    return ort.InferenceSession(build_demo_model(**SMALL, seed=seed).SerializeToString())


def reference(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """The whole small demo model run in process: what every answer must equal."""
    return np.asarray(_reference_session(seed).run(None, {"input_ids": ids})[0])


def metric_sum(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (with these labels) in ``url``'s /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


# --- one record per fault --------------------------------------------------------------------


@dataclass
class FaultRecord:
    """Counts of one fault (or one kind of bad input) under one load."""

    fault: str
    load: str
    sent: int = 0  # requests (and job submissions) sent
    failed: int = 0  # answers other than the expected one (for good requests: a correct 200)
    status_4xx: int = 0
    status_5xx: int = 0  # every 5xx, documented refusals (503) included
    status_500: int = 0  # 500s: real bugs only, by docs/design.md's rule
    jobs_accepted: int = 0
    jobs_lost: int = 0  # accepted (202) but never succeeded with the right result
    outcome: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    group: str = "fault"  # "bad input", "connections", "switch": the section of reliability.md

    def count(self, tally: Tally) -> None:
        self.sent += tally.sent
        self.failed += tally.failed
        self.status_4xx += tally.in_range(400, 500)
        self.status_5xx += tally.in_range(500, 600)
        self.status_500 += tally.statuses.get(500, 0)


@contextlib.contextmanager
def timed(record: FaultRecord) -> Iterator[FaultRecord]:
    started = time.perf_counter()
    try:
        yield record
    finally:
        record.seconds = round(time.perf_counter() - started, 1)


# --- requests and bounded loads --------------------------------------------------------------


@dataclass
class Answer:
    status: int  # 0: no HTTP answer (refused, reset, timed out)
    headers: dict[str, str]
    body: bytes
    seconds: float


def post(url: str, body: bytes, headers: dict[str, str], timeout: float = 60) -> Answer:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Answer(
                response.status, dict(response.headers), response.read(), time.monotonic() - started
            )
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers), error.read(), time.monotonic() - started)
    except (urllib.error.URLError, OSError, HTTPException) as exc:
        return Answer(0, {}, repr(exc).encode(), time.monotonic() - started)


def infer_request(ids: np.ndarray, timeout_us: int | None = None) -> tuple[bytes, dict[str, str]]:
    parameters = {"timeout": timeout_us} if timeout_us else None
    body, length = encode_request({"input_ids": ids}, parameters=parameters)
    return body, {HEADER: str(length)}


def answer_matches(answer: Answer, want: np.ndarray) -> bool:
    if answer.status != 200:
        return False
    try:
        result = decode_response(answer.body, int(answer.headers[HEADER]))
        got = result.outputs["last_hidden_state"]
    except Exception:  # any undecodable answer is a wrong answer
        return False
    return bool(got.shape == want.shape and np.allclose(got, want, atol=1e-4))


@dataclass
class Tally:
    """What a load saw: answers by status, wrong answers, cache outcomes, slowest answer."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)
    max_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def in_range(self, low: int, high: int) -> int:
        return sum(n for status, n in self.statuses.items() if low <= status < high)

    def add(self, answer: Answer, expected: bool) -> None:
        self.sent += 1
        self.statuses[answer.status] += 1
        self.max_seconds = max(self.max_seconds, answer.seconds)
        if "X-Appliance-Cache" in answer.headers:
            self.cache[answer.headers["X-Appliance-Cache"]] += 1
        if expected:
            self.ok += 1
            return
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(f"{answer.status}: {answer.body[:300]!r}")


class Background:
    """A thread running ``_run`` between ``with`` and its end; ``_run`` stops once ``_stop`` is
    set."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        raise NotImplementedError


class Load:
    """``concurrency`` threads send infer requests until ``limit`` were sent or ``stop()``.

    Request ``i`` carries ``inputs[i % len(inputs)]``; an answer counts as expected when it is a
    200 equal to the reference for that input.
    """

    def __init__(
        self,
        url: str,
        inputs: list[np.ndarray],
        concurrency: int,
        limit: int,
        headers: dict[str, str] | None = None,
        timeout_us: int | None = None,
        model: str = "demo",
    ) -> None:
        self.url = f"{url}/v2/models/{model}/infer"
        self.requests = [infer_request(ids, timeout_us) for ids in inputs]
        self.wants = [reference(ids) for ids in inputs]
        self.headers = headers if headers is not None else NO_CACHE
        self.limit = limit
        self.tally = Tally()
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work) for _ in range(concurrency)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                index = self._next
                self._next += 1
            if index >= self.limit:
                return
            body, headers = self.requests[index % len(self.requests)]
            answer = post(self.url, body, {**headers, **self.headers})
            expected = answer_matches(answer, self.wants[index % len(self.wants)])
            with self._lock:
                self.tally.add(answer, expected)

    def wait_answered(self, count: int, timeout_s: float = 120) -> None:
        end = time.monotonic() + timeout_s
        while self.tally.sent < count and any(t.is_alive() for t in self._threads):
            if time.monotonic() > end:
                raise TimeoutError(f"{count} answers not reached in {timeout_s}s")
            time.sleep(0.01)

    def join(self) -> Tally:
        """Wait until ``limit`` requests were answered."""
        for thread in self._threads:
            thread.join()
        return self.tally

    def stop(self) -> Tally:
        """Send no more; wait for the requests in flight."""
        self._stop.set()
        return self.join()


def run_load(
    url: str, inputs: list[np.ndarray], concurrency: int, count: int, **options: Any
) -> Tally:
    with Load(url, inputs, concurrency, count, **options) as load:
        return load.join()


def token_rows(count: int, tokens: int = 8, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, SMALL["vocab"], size=(1, tokens)).astype(np.int64) for _ in range(count)
    ]


# --- rings ------------------------------------------------------------------------------------


@contextlib.contextmanager
def ring_of(
    work: Path, nodes: list[str], stages: int, replicas: int, *coordinator: str
) -> Iterator[Ring]:
    """A coordinator and ``nodes`` on loopback with the small demo model placed and ready."""
    ring = Ring(work, make_repo(work / "repo"))
    ring.start_coordinator(*coordinator)
    try:
        for node in nodes:
            ring.start_node(node)
        ring.wait_members(len(nodes))
        ring.load("demo", stages=stages, replicas=replicas)
        ring.wait_ready()
        yield ring
    finally:
        ring.stop()


def placement(ring: Ring) -> dict[str, Any]:
    return http("GET", ring.url + "/v2/cluster")[1]["placements"]["demo"]


def member(ring: Ring, node_id: str) -> dict[str, Any]:
    nodes = {n["node_id"]: n for n in http("GET", ring.url + "/v2/cluster")[1]["nodes"]}
    return nodes[node_id]


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until ``check()`` held; TimeoutError naming ``what`` otherwise."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not happen in {timeout_s}s")


def model_digest(ring: Ring) -> str:
    return str(http("GET", ring.url + "/v2/cluster")[1]["models"]["demo"]["serving_digest"])
