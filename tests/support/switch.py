"""A version switch under load: closed-loop clients that classify every answer as v1's, v2's
or neither (a mix of spans, or an error), a sampler of the nodes' per-slot in-flight gauges,
and the load call timed in between. Used by tests/integration/test_version_switch.py and by
``python -m bench.faults`` (its "version switch under load" row)."""

from __future__ import annotations

import functools
import json
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from exporter.demo_model import build_demo_model
from exporter.export import export_model
from runtime.codec import decode_response
from tests.support.faults.common import NO_CACHE, FaultRecord, infer_request, post
from tests.support.harness import http

# big enough that a node is busy most of the time under 8 clients (a few ms per request)
SWITCH_MODEL = {"blocks": 4, "hidden": 128, "heads": 4, "ffn": 512, "vocab": 300}
HEADER = "Inference-Header-Content-Length"


def export_version(repo: Path, version: int, seed: int, name: str = "demo") -> Path:
    """Version ``version`` of the switch model: another seed, other bytes in every segment."""
    model = build_demo_model(**SWITCH_MODEL, seed=seed)
    export_model(model, repo, name, version=version, min_segment_bytes=0, source_label="test")
    return repo


@functools.cache
def _session(seed: int) -> ort.InferenceSession:
    return ort.InferenceSession(build_demo_model(**SWITCH_MODEL, seed=seed).SerializeToString())


def reference(ids: np.ndarray, seed: int) -> np.ndarray:
    return np.asarray(_session(seed).run(None, {"input_ids": ids})[0])


@dataclass
class Sample:
    sent: float
    done: float
    status: int
    label: str  # a version's label, "wrong" (a 200 equal to no version: a mix) or "error"


@dataclass
class ClosedLoop:
    """``clients`` threads, each sending its next request as soon as the last is answered."""

    url: str
    ids: np.ndarray
    references: dict[str, np.ndarray]  # label -> the whole answer of that version
    clients: int = 8
    model: str = "demo"
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)
        ]

    def _run(self) -> None:
        body, headers = infer_request(self.ids)
        target = f"{self.url}/v2/models/{self.model}/infer"
        while not self._stop.is_set():
            sent = time.monotonic()
            answer = post(target, body, {**headers, **NO_CACHE}, timeout=60)
            label = "error"
            if answer.status == 200:
                got = decode_response(answer.body, int(answer.headers[HEADER]))
                hidden = got.outputs["last_hidden_state"]
                label = next(
                    (k for k, want in self.references.items()
                     if hidden.shape == want.shape and np.allclose(hidden, want, atol=1e-4)),
                    "wrong",
                )  # fmt: skip
            with self._lock:
                self.samples.append(Sample(sent, time.monotonic(), answer.status, label))
                if label in ("error", "wrong") and len(self.errors) < 5:
                    self.errors.append(f"{answer.status} {label}: {answer.body[:300]!r}")

    def __enter__(self) -> ClosedLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=70)

    def answered(self) -> int:
        with self._lock:
            return len(self.samples)

    def labels(self, sent_after: float = 0.0) -> Counter[str]:
        with self._lock:
            return Counter(s.label for s in self.samples if s.sent >= sent_after)


class InFlightSampler:
    """Polls every node's ``appliance_in_flight{digest}`` (one thread per node, no pause) while
    the switch runs: how often the old version had work in flight on a node, and the most RSS
    a node had while it held both versions (a window of tens of ms: caught when it is caught)."""

    def __init__(self, node_urls: list[str], old_digest: str, new_digest: str) -> None:
        self.urls = node_urls
        self.old, self.new = old_digest, new_digest
        self.old_busy = 0  # samples with work in flight on the old version
        self.samples = 0
        self.rss_before = {u: _rss(u) for u in node_urls}
        self.rss_both: dict[str, float] = {}  # the most RSS seen while holding both versions
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(u,), daemon=True)
                         for u in node_urls]  # fmt: skip

    def _run(self, url: str) -> None:
        while not self._stop.is_set():
            gauges = _samples(url, "appliance_in_flight")
            held_new = any(labels.get("digest") == self.new for labels, _ in gauges)
            held_old = any(labels.get("digest") == self.old for labels, _ in gauges)
            busy_old = any(v > 0 for labels, v in gauges if labels.get("digest") == self.old)
            rss = _rss(url) if held_new and held_old else 0.0
            with self._lock:
                self.samples += 1
                self.old_busy += busy_old
                if rss:
                    self.rss_both[url] = max(self.rss_both.get(url, 0.0), rss)

    def __enter__(self) -> InFlightSampler:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)


def _samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """``name``'s samples in ``url``'s /metrics: (labels, value)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return []
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def _rss(url: str) -> float:
    return sum(v for _, v in _samples(url, "appliance_process_resident_bytes"))


@dataclass
class SwitchResult:
    status: int
    body: Any
    started: float
    returned: float
    before: Counter[str]  # answers to requests sent before the load call
    during: Counter[str]
    after: Counter[str]  # requests sent after the load call returned
    old_busy_samples: int  # node samples, during the load call, with work in flight on old
    node_samples: int
    errors: list[str]
    rss_before: dict[str, float]  # by node URL, before the load call
    rss_both: dict[str, float]  # the most while the node held both versions
    long: Counter[str] = field(default_factory=Counter)  # the long requests' answers

    @property
    def seconds(self) -> float:
        return self.returned - self.started

    @property
    def total(self) -> int:
        return sum((self.before + self.during + self.after).values())

    def count(self, label: str) -> int:
        return (self.before + self.during + self.after)[label]


def switch_under_load(
    coordinator_url: str,
    node_urls: list[str],
    ids: np.ndarray,
    references: dict[str, np.ndarray],
    old_digest: str,
    new_digest: str,
    parameters: dict[str, Any],
    clients: int = 8,
    settle_s: float = 2.0,
    token: str = "",
    long: tuple[np.ndarray, dict[str, np.ndarray]] | None = None,
) -> SwitchResult:
    """Clients running before the load call until ``settle_s`` after it returns. ``long``:
    (ids, references) of requests many times as long, sent one after another by one more
    client: the coordinator's requests of the short clients leave and return together (hop
    batching), so the flip may come in a gap between them; a long one is in flight then."""
    long_ids, long_refs = long if long is not None else (ids, references)
    with (
        ClosedLoop(coordinator_url, ids, references, clients) as loop,
        ClosedLoop(coordinator_url, long_ids, long_refs, 1 if long else 0) as long_loop,
    ):
        end = time.monotonic() + 30
        while loop.answered() < clients * 3 and time.monotonic() < end:
            time.sleep(0.02)
        with InFlightSampler(node_urls, old_digest, new_digest) as sampler:
            started = time.monotonic()
            status, body = http(
                "POST",
                f"{coordinator_url}/v2/repository/models/demo/load",
                {"parameters": parameters},
                timeout=180,
                token=token,
            )
            returned = time.monotonic()
        time.sleep(settle_s)
    everything = loop.labels()
    after = loop.labels(sent_after=returned)
    from_start = loop.labels(sent_after=started)
    return SwitchResult(
        status,
        body,
        started,
        returned,
        everything - from_start,
        from_start - after,
        after,
        sampler.old_busy,
        sampler.samples,
        loop.errors,
        sampler.rss_before,
        sampler.rss_both,
        long_loop.labels(),
    )


# --- the bench.faults row --------------------------------------------------------------------


def _record(label: str, load: str, result: SwitchResult, old: str, new: str) -> FaultRecord:
    record = FaultRecord(label, load, group="switch")
    record.sent = result.total
    record.failed = (
        result.count("error")
        + result.count("wrong")
        + sum(n for k, n in result.after.items() if k != new)
    )
    record.status_5xx = result.count("error")
    record.seconds = round(result.seconds, 1)
    mib = 2**20
    grew = [(result.rss_both[u] - result.rss_before.get(u, 0.0)) / mib for u in result.rss_both]
    record.details = {
        "load_status": result.status,
        "switch_s": round(result.seconds, 2),
        "mixed_answers": result.count("wrong"),
        f"answers_{old}": result.count(old),
        f"answers_{new}": result.count(new),
        "node_samples_old_version_busy": result.old_busy_samples,
        "node_rss_both_versions_mib": {
            u.rsplit(":", 1)[-1]: round(result.rss_both[u] / mib) for u in result.rss_both
        },
        "node_rss_growth_mib_max": round(max(grew), 1) if grew else None,
    }
    record.outcome = (
        f"load {result.status} in {result.seconds:.1f} s; {record.failed} failed, "
        f"{result.count('wrong')} mixed; {result.count(old)} answers of {old}, "
        f"{result.count(new)} of {new}; "
        + (
            f"a node held both at up to {max(result.rss_both.values()) / mib:.0f} MiB RSS "
            f"(+{max(grew):.0f} MiB)"
            if grew
            else "no node held both versions"
        )  # fmt: skip
    )
    return record


def version_switch(work: Path, clients: int = 8) -> list[FaultRecord]:
    """v1 -> v2 side by side, rollback to v1 by name, and a rolling v1 -> v2 where memory
    holds one version, each under ``clients`` closed-loop clients (cache bypassed)."""
    from tests.support.harness import Ring  # the harness's real processes

    ids = (np.arange(12, dtype=np.int64).reshape(1, 12) * 7) % 300
    refs = {"v1": reference(ids, 0), "v2": reference(ids, 1)}
    records = []
    for rolling in (False, True):
        folder = work / ("rolling" if rolling else "side-by-side")
        repo = export_version(folder / "repo", 1, 0)
        ring = Ring(folder, repo)
        nodes = ["a", "b", "c", "d"] if rolling else ["a", "b"]
        flags = ["--memory-budget", "170000000"] if rolling else []
        try:
            ring.start_coordinator("--replace-after-s", "0", "--drain-timeout-s", "20")
            for node in nodes:
                ring.start_node(node, *flags)
            ring.wait_members(len(nodes))
            ring.load("demo", stages=2, replicas=2 if rolling else 1)
            ring.wait_ready()
            v1 = str(http("GET", ring.url + "/v2/cluster")[1]["models"]["demo"]["serving_digest"])
            export_version(repo, 2, 1)
            v2 = str(json.loads((repo / "demo" / "2" / "manifest.json").read_text())["digest"])
            urls = list(ring.node_urls.values())
            how = "rolling, memory for one version" if rolling else "side by side"
            where = f"{len(nodes)} nodes, 2 spans x {2 if rolling else 1} replica(s)"
            load = f"{clients} closed-loop clients; {where}"
            result = switch_under_load(ring.url, urls, ids, refs, v1, v2, {}, clients)
            records.append(_record(f"version switch under load ({how})", load, result, "v1", "v2"))
            if not rolling:
                to_v1 = {"version": "1"}
                back = switch_under_load(ring.url, urls, ids, refs, v2, v1, to_v1, clients)
                records.append(
                    _record("version rollback by name under load", load, back, "v2", "v1")
                )
        finally:
            ring.stop()
    return records
