"""Faults of the ring's processes: nodes killed, hung or restarted with other bytes, the
coordinator killed with async jobs queued, internal calls unsigned, forged or replayed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from appliance.security.signing import HEADER_SIGNATURE, Signer
from tests.support.faults.common import (
    NO_CACHE,
    Answer,
    FaultRecord,
    Load,
    Tally,
    infer_request,
    make_repo,
    member,
    metric_sum,
    model_digest,
    placement,
    post,
    reference,
    ring_of,
    run_load,
    timed,
    token_rows,
    wait_for,
)
from tests.support.harness import Ring, http

# --- node faults -----------------------------------------------------------------------------


def node_kill(work: Path, requests: int = 1000, concurrency: int = 16) -> FaultRecord:
    """kill -9 of a replica of the first span after 20 % of the load; then it is restarted
    (same id, a new incarnation) and must get its span back and take load again."""
    record = FaultRecord(
        "node kill -9 under load, then restarted",
        f"{requests:,} requests at concurrency {concurrency}; 4 nodes, 2 spans x 2 replicas",
    )
    ids = token_rows(1, 12)
    with timed(record), ring_of(work, ["a", "b", "c", "d"], 2, 2) as ring:
        victim = placement(ring)["spans"][0]["replicas"][0]
        with Load(ring.url, ids, concurrency, requests) as load:
            load.wait_answered(requests // 5)
            ring.kill(victim)
            record.count(load.join())
        ejections = metric_sum(ring.url, "appliance_ejections_total")
        url = ring.start_node(victim)

        def back() -> bool:
            node = member(ring, victim)
            return bool(node["address"] == url and node["healthy"] and node["spans"])

        rejoin_s = wait_for(back, 60, f"restarted {victim} holding its span")
        before = metric_sum(url, "appliance_model_inferences_total")
        after = run_load(ring.url, ids, max(1, concurrency // 2), max(50, requests // 5))
        record.count(after)
        taken = metric_sum(url, "appliance_model_inferences_total") - before
    record.details = {"victim": victim, "ejections": ejections, "rejoin_s": round(rejoin_s, 2)}
    record.details["restarted_node_runs"] = taken
    record.outcome = (
        f"{victim} killed after {requests // 5} answers; {ejections:.0f} ejection(s); restarted, "
        f"back in its span after {rejoin_s:.1f} s and ran {taken:.0f} of the next {after.sent}"
    )
    return record


def node_hang(
    work: Path, requests: int = 300, concurrency: int = 8, deadline_s: float = 5.0
) -> FaultRecord:
    """SIGSTOP of a replica of the second span after 20 % of the load: every request must
    fail over inside its own deadline (the ``timeout`` parameter)."""
    record = FaultRecord(
        "node hung (SIGSTOP) under load",
        f"{requests:,} requests at concurrency {concurrency}, {deadline_s:g} s deadline each; "
        "4 nodes, 2 spans x 2 replicas",
    )
    ids = token_rows(1, 8)
    with timed(record), ring_of(work, ["a", "b", "c", "d"], 2, 2) as ring:
        hung = placement(ring)["spans"][1]["replicas"][0]
        try:
            with Load(
                ring.url, ids, concurrency, requests, timeout_us=int(deadline_s * 1e6)
            ) as load:
                load.wait_answered(requests // 5)
                ring.kill(hung, signal.SIGSTOP)
                tally = load.join()
        finally:
            ring.kill(hung, signal.SIGCONT)
        record.count(tally)
    record.details = {"hung": hung, "max_latency_s": round(tally.max_seconds, 3)}
    record.outcome = (
        f"{hung} stopped after {requests // 5} answers; slowest answer {tally.max_seconds:.2f} s "
        f"(deadline {deadline_s:g} s)"
    )
    return record


def node_other_version_never_routed(
    work: Path, requests: int = 200, after_kill: int = 20
) -> FaultRecord:
    """A node serving other bytes under the same name and version (seed 1) is never in a
    route: all answers come from the good node, and once it is gone requests get 503."""
    record = FaultRecord(
        "node holding another version of the model",
        f"{requests:,} requests at concurrency 4, then {after_kill} after the good node died",
    )
    ring = Ring(work, make_repo(work / "repo"))
    with timed(record):
        ring.start_coordinator()
        try:
            ring.start_node("good")
            # "other" loads its own package (seed 1) at start; too little memory to be placed on
            other_repo = make_repo(work / "other", seed=1)
            ring.start_node(
                "other", "--model-repo", str(other_repo), "--models", "demo", "--memory-budget", "1"
            )
            ring.wait_members(2)
            ring.load("demo", stages=1, replicas=1)
            ring.wait_ready()
            wait_for(lambda: bool(member(ring, "other")["spans"]), 30, "other holding its span")
            other_digest = member(ring, "other")["spans"][0]["digest"]
            digest = model_digest(ring)
            served = run_load(ring.url, token_rows(8), 4, requests)
            ring.kill("good")
            time.sleep(2.5)  # silent past node_timeout_s
            refused = _refused_after_kill(ring, after_kill)
        finally:
            ring.stop()
    record.count(served)
    record.count(refused)
    wrong = served.statuses[200] - served.ok + refused.statuses[200]  # the other bytes' answers
    record.details = {"other_digest": other_digest, "digest": digest, "wrong_answers": wrong}
    record.details["refused"] = dict(refused.statuses)
    record.outcome = (
        f"digests differ ({other_digest[:15]} vs {digest[:15]}); {served.ok}/{served.sent} "
        f"answered right by the good node, then {refused.ok}/{refused.sent} refused 503 'no "
        f"live replica'; {wrong} answers from the other bytes"
    )
    return record


def _refused_after_kill(ring: Ring, count: int) -> Tally:
    """``count`` requests that must each be refused 503 naming the missing replica."""
    tally = Tally()
    body, headers = infer_request(token_rows(1)[0])
    for _ in range(count):
        answer = post(f"{ring.url}/v2/models/demo/infer", body, {**headers, **NO_CACHE})
        refused = answer.status == 503 and b"replica" in answer.body
        tally.add(answer, refused)
    return tally


def node_restarted_with_other_version(
    work: Path, requests: int = 2000, concurrency: int = 8
) -> FaultRecord:
    """A replica is killed and restarted with other bytes of the same model version on its disk
    (loaded at start): it is kept out of routes until it holds the coordinator's digest again
    (the coordinator reloads it; the node fetches the right files), then takes load again."""
    record = FaultRecord(
        "node restarted with another version of the model",
        f"load at concurrency {concurrency} until the node is consistent again (at most "
        f"{requests:,} requests), then {max(50, requests // 10)} more; 2 nodes, 1 span x 2 "
        "replicas",
    )
    ids = token_rows(4, 6)
    with timed(record), ring_of(work, ["a", "b"], 1, 2) as ring:
        digest = model_digest(ring)
        seen: set[str] = set()
        with Load(ring.url, ids, concurrency, requests) as load:
            load.wait_answered(min(200, requests // 5))
            ring.kill("b")
            ring.nodes["b"].wait()
            shutil.rmtree(work / "b" / "demo")
            make_repo(work / "b", seed=1)  # same name and version, other bytes
            url = ring.start_node("b", "--models", "demo")

            def consistent() -> bool:
                node = member(ring, "b")
                if node["address"] != url:
                    return False
                held = {s["digest"] for s in node["spans"]}
                seen.update(held)
                return digest in held

            consistent_s = wait_for(consistent, 60, "b holding the model's digest")
            tally = load.stop()
        record.count(tally)
        before = metric_sum(url, "appliance_model_inferences_total")
        after = run_load(ring.url, ids, concurrency, max(50, requests // 10))
        record.count(after)
        taken = metric_sum(url, "appliance_model_inferences_total") - before
    other = sorted(seen - {digest})
    wrong = tally.statuses[200] - tally.ok  # 200s whose values were not the model's
    record.details = {"consistent_s": round(consistent_s, 2), "other_digests_seen": other}
    record.details.update(wrong_answers=wrong, restarted_node_runs=taken)
    shown = f"it reported {other[0][:15]} first; " if other else ""
    record.outcome = (
        f"b back with other bytes: {shown}out of routes until consistent after "
        f"{consistent_s:.1f} s; {wrong} answers from the other bytes; then ran {taken:.0f} of "
        f"the next {after.sent}"
    )
    return record


# --- coordinator faults ----------------------------------------------------------------------


def submit(url: str, ids: np.ndarray) -> Answer:
    body, headers = infer_request(ids)
    return post(f"{url}/v2/models/demo/infer", body, {**headers, "Prefer": "respond-async"})


def wait_job(url: str, location: str, timeout_s: float = 60) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        status, job = http("GET", url + location)
        if status == 200 and job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    return {"status": "unfinished", "location": location}


def job_result_matches(job: dict[str, Any], ids: np.ndarray) -> bool:
    if job["status"] != "succeeded":
        return False
    output = job["result"]["outputs"][0]
    got = np.array(output["data"], np.float32).reshape(output["shape"])
    return bool(np.allclose(got, reference(ids), atol=1e-4))


def coordinator_kill_with_jobs(work: Path, jobs: int = 100) -> FaultRecord:
    """kill -9 of the coordinator with async jobs queued (the first span's node is paused while
    they are submitted, so none can finish), a restart on the same state dir, then the rest of
    the jobs: every accepted job must succeed with the right result, the placement come back."""
    kill_at = jobs * 3 // 5
    record = FaultRecord(
        "coordinator kill -9 with queued async jobs",
        f"{jobs} jobs (kill after {kill_at} accepted), then sync requests; 2 nodes, 2 spans",
    )
    batches = token_rows(jobs, 8, seed=1)
    accepted: list[tuple[np.ndarray, str]] = []
    with timed(record), ring_of(work, ["a", "b"], 2, 1) as ring:
        before = placement(ring)
        first = before["spans"][0]["replicas"][0]
        ring.kill(first, signal.SIGSTOP)  # hold the queue: nothing finishes before the kill
        try:
            _submit_all(ring, batches[:kill_at], accepted, record)
            assert ring.coordinator is not None
            ring.coordinator.kill()
            ring.coordinator.wait()
        finally:
            ring.kill(first, signal.SIGCONT)
        ring.start_coordinator()  # same port and state dir
        ring.wait_members(2)
        ring.wait_ready()
        after = placement(ring)
        _submit_all(ring, batches[kill_at:], accepted, record)
        record.jobs_lost = sum(
            not job_result_matches(wait_job(ring.url, location), ids) for ids, location in accepted
        )
        record.count(run_load(ring.url, batches[:8], 4, 40))
        resumed = _resumed_jobs(work / "coordinator.log")
    record.jobs_accepted = len(accepted)
    same = after == before
    record.details = {"resumed": resumed, "placement_kept": same}
    record.outcome = (
        f"{resumed} job(s) queued or running at the kill resumed by the new coordinator; "
        f"{record.jobs_accepted - record.jobs_lost}/{record.jobs_accepted} succeeded with the "
        f"right result; placement {'kept' if same else 'CHANGED'}; sync requests served after"
    )
    return record


def _submit_all(
    ring: Ring,
    batches: list[np.ndarray],
    accepted: list[tuple[np.ndarray, str]],
    record: FaultRecord,
) -> None:
    """Submit every batch as an async job from 8 threads; count the 202s."""
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda ids: submit(ring.url, ids), batches))
    tally = Tally()
    for ids, answer in zip(batches, answers, strict=True):
        tally.add(answer, answer.status == 202)
        if answer.status == 202:
            accepted.append((ids, answer.headers["Location"]))
    record.count(tally)


def _resumed_jobs(log: Path) -> int:
    found = re.findall(r"resumed (\d+) job", log.read_text())
    return sum(int(n) for n in found)


# --- node-to-node trust -------------------------------------------------------------------


def _signed(signer: Signer, method: str, path: str, body: bytes) -> dict[str, str]:
    headers = {"Content-Type": "application/json"} if body else {}
    headers[HEADER_SIGNATURE] = signer.header(method, path, headers, body)
    return headers


def internal_calls_unsigned_or_replayed(
    work: Path, per_kind: int = 20, replay_s: float = 4.5
) -> list[FaultRecord]:
    """A signed ring: unsigned hops and heartbeats, and heartbeats signed with another secret,
    are refused 401; a captured, valid heartbeat replayed after its node was killed is refused
    every time, and the dead node stays out of the ring."""
    unsigned = FaultRecord(
        "unsigned or forged internal calls",
        f"{per_kind} each: unsigned hop to a node, unsigned heartbeat, heartbeat signed with "
        "another secret",
    )
    replayed = FaultRecord(
        "replayed heartbeat of a killed node",
        f"one captured heartbeat sent, its node killed, then replayed every 0.2 s for "
        f"{replay_s:g} s (node timeout 2 s)",
    )
    ring = Ring(work, make_repo(work / "repo"))
    with timed(unsigned):
        ring.start_coordinator()
        try:
            node_url = ring.start_node("a")
            ring.wait_members(1)
            secret = ring.secrets_file.read_text().split()[0].encode()
            forged = _signed(
                Signer(os.urandom(32).hex().encode(), "a"), "POST", "/internal/heartbeat", b"{}"
            )
            calls = [
                (node_url + "/internal/hop", {}),
                (ring.url + "/internal/heartbeat", {}),
                (ring.url + "/internal/heartbeat", forged),
            ]
            tally = Tally()
            for url, headers in calls * per_kind:
                answer = post(url, b"{}", headers, timeout=10)
                tally.add(answer, answer.status == 401)
            unsigned.count(tally)
            with timed(replayed):
                replay, alive = _replay_heartbeat(ring, node_url, secret, replay_s)
            replayed.count(replay)
        finally:
            ring.stop()
    unsigned.outcome = f"{tally.ok}/{tally.sent} refused 401"
    replayed.failed += alive
    replayed.details = {"dead_node_healthy_after": alive}
    replayed.outcome = (
        f"the first send accepted; {replay.ok - 1}/{replay.sent - 1} replays refused 401 "
        f"(already received); the dead node {'STAYED' if alive else 'was dropped'} from the "
        "live members"
    )
    return [unsigned, replayed]


def _replay_heartbeat(
    ring: Ring, node_url: str, secret: bytes, seconds: float
) -> tuple[Tally, bool]:
    """Capture a heartbeat signed as node a, send it once, kill a, replay it for ``seconds``;
    the answers, and whether a still counted as healthy at the end."""
    signed_get = _signed(Signer(secret, "coordinator"), "GET", "/internal/identity", b"")
    request = urllib.request.Request(node_url + "/internal/identity", headers=signed_get)
    with urllib.request.urlopen(request, timeout=10) as response:
        identity = json.loads(response.read())
    beat = {**identity, "address": node_url, "memory_budget": 1 << 30, "spans": []}
    body = json.dumps(beat).encode()
    captured = _signed(Signer(secret, "a"), "POST", "/internal/heartbeat", body)
    tally = Tally()
    first = post(ring.url + "/internal/heartbeat", body, captured, timeout=10)
    tally.add(first, first.status == 200)
    ring.kill("a")
    ring.nodes["a"].wait(timeout=10)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        answer = post(ring.url + "/internal/heartbeat", body, captured, timeout=10)
        tally.add(answer, answer.status == 401 and b"already received" in answer.body)
        time.sleep(0.2)
    return tally, bool(member(ring, "a")["healthy"])
