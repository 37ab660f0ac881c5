"""The coordinator's inference path: a v2 body in, an answer out, from the result cache when it
can, else through the ring (hop batching for batchable models), and async jobs.

Every request's id is the one the coordinator logs under (``X-Request-Id``, else made by the
request-id middleware), and it is the id every hop of that request carries, so the log lines
of one request on every process share it. A hop that carries several batched requests is
named ``first-id+N``.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import numpy as np

from appliance.coordinator.entries import ModelEntry
from appliance.coordinator.hop_batcher import HopBatcher
from appliance.coordinator.placement import Placement
from appliance.coordinator.request_policy import CacheControl
from appliance.coordinator.switch import counting
from appliance.errors import BadRequest, NoLiveReplica
from appliance.http.logs import current_request_id
from appliance.http.v2 import deadline_from
from cache.job import Job
from cache.keys import cache_key
from runtime.codec import (
    decode_checked_request,
    decode_response,
    encode_request,
    encode_response,
)
from runtime.deadline import Deadline
from runtime.errors import DeadlineExceeded
from runtime.stats import ModelStats

if TYPE_CHECKING:
    from appliance.coordinator.service import Coordinator

DEFAULT_CACHE_CONTROL = CacheControl()


def rows_of(inputs: dict[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def request_id() -> str:
    """The id of the request being served (what its log lines and hops carry)."""
    return current_request_id.get() or uuid.uuid4().hex[:16]


class InferencePath:
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    async def infer_body(
        self,
        name: str,
        version: str | None,
        body: bytes,
        length: int | None,
        cache_control: CacheControl = DEFAULT_CACHE_CONTROL,
    ) -> tuple[bytes, int | None, str]:
        """One inference from a v2 body: the cache, else the ring. Returns the answer's body,
        its header length and the cache outcome (hit, miss or bypass)."""
        c = self.c
        entry, placement = c.placed(name, version)
        if entry.manifest.is_generation:
            raise BadRequest(
                f"model {name} is a generation model: use /v2/models/{name}/generate, "
                "/v1/completions or /v1/chat/completions"
            )
        stats = c.model_stats(name, entry.version)
        started = time.perf_counter_ns()
        try:
            with counting(c.in_flight, entry.digest):  # a switch retires it only after
                return await self._infer(entry, placement, body, length, cache_control, stats)
        except Exception:
            stats.fail.add(time.perf_counter_ns() - started)
            raise

    async def _infer(
        self,
        entry: ModelEntry,
        placement: Placement,
        body: bytes,
        length: int | None,
        cache_control: CacheControl,
        stats: ModelStats,
    ) -> tuple[bytes, int | None, str]:
        c = self.c
        name = entry.name
        started = time.perf_counter_ns()
        decoded = decode_checked_request(
            body, length, entry.signature, c.config.max_tensor_elements
        )
        wanted = [o.name for o in decoded.outputs] if decoded.outputs else None
        names = wanted or entry.signature.output_names()
        policy = c.cache_policies.get(name, c.default_cache_policy)
        use_cache = c.cache is not None and policy.enabled
        key = (
            cache_key(entry.digest, decoded.inputs, wanted)
            if use_cache and (cache_control.read or cache_control.write)
            else None
        )
        outputs = None
        looked_up = time.perf_counter_ns()
        if key is not None and cache_control.read and c.cache is not None:
            outputs = c.cache.get(key)
            lookup_ns = time.perf_counter_ns() - looked_up
            (stats.cache_hit if outputs is not None else stats.cache_miss).add(lookup_ns)
        # bypass: not looked up (the cache off for this model, or Cache-Control: no-cache)
        looked = key is not None and cache_control.read
        outcome = "hit" if outputs is not None else ("miss" if looked else "bypass")
        c.metrics.cache.labels(name, outcome).inc()
        if outputs is None:
            deadline = deadline_from(decoded.parameters)
            queued: list[float] = [0.0]
            to_ring = time.perf_counter_ns()
            if c.config.hop_batching and deadline is None and entry.signature.batchable:
                answered = await self._batcher(name, entry, placement).infer(
                    decoded.inputs,
                    request_id(),
                    Deadline.after(c.config.request_timeout_s),
                    on_sent=lambda seconds: queued.__setitem__(0, seconds),
                )
            else:
                answered = await self.hop(
                    name, entry, placement, decoded.inputs, request_id(), deadline
                )
            queue_ns = int(queued[0] * 1e9)
            stats.queue.add(queue_ns)
            stats.compute_infer.add(time.perf_counter_ns() - to_ring - queue_ns)
            outputs = {n: answered[n] for n in names}
            if key is not None and cache_control.write and c.cache is not None:
                c.cache.offer(key, outputs, policy.ttl_s)
        out, out_length = encode_response(
            name,
            entry.version,
            decoded.id,
            [(n, outputs[n]) for n in names],
            [decoded.wants_binary(n) for n in names],
            {"cache": "hit"} if outcome == "hit" else None,
        )
        stats.inference_count += rows_of(decoded.inputs)
        stats.last_inference_ms = int(time.time() * 1000)
        stats.success.add(time.perf_counter_ns() - started)
        return out, out_length, outcome

    async def hop(
        self,
        name: str,
        entry: ModelEntry,
        placement: Placement,
        inputs: dict[str, np.ndarray],
        hop_id: str,
        deadline: Deadline | None = None,
    ) -> dict[str, np.ndarray]:
        """One hop into the ring with these inputs: every output of the model's last span.
        ``deadline``: the request's own, else request_timeout_s from now."""
        c = self.c
        own = deadline is not None
        deadline = deadline or Deadline.after(c.config.request_timeout_s)
        route = c.cluster.route(name, entry.digest, len(entry.sizes), placement, time.monotonic())
        payload, payload_length = encode_request(inputs)
        started = time.perf_counter_ns()
        try:
            answer, answer_length = await c.hops.call(
                route, name, entry.digest, hop_id, deadline, payload, payload_length
            )
        except NoLiveReplica as exc:
            # the client's own timeout ran out, not the ring: 504, and not a 503 that
            # tells it (and the job runner) to retry a request that cannot make it
            if own and deadline.expired():
                raise DeadlineExceeded(
                    f"request {hop_id}: its timeout passed before the ring answered"
                ) from exc
            raise
        rows = rows_of(inputs)
        c.metrics.hop_rows.labels(name).observe(rows)
        c.model_stats(name, entry.version).record_execution(rows, time.perf_counter_ns() - started)
        return decode_response(answer, answer_length).outputs

    def _batcher(self, name: str, entry: ModelEntry, placement: Placement) -> HopBatcher:
        """The model's hop batcher (a new one when the model's bytes change)."""
        c = self.c
        key = (name, entry.digest)
        batcher = c.hop_batchers.get(key)
        if batcher is None:
            for old in [k for k in c.hop_batchers if k[0] == name]:
                del c.hop_batchers[old]  # its queued and in-flight hops finish on their own
            digest = entry.digest

            async def send(
                inputs: dict[str, np.ndarray], hop_id: str, deadline: Deadline
            ) -> dict[str, np.ndarray]:
                # the bytes the requests were checked against, on their current replicas
                current, now_placed = c.by_digest(name, digest)
                return await self.hop(name, current, now_placed, inputs, hop_id, deadline)

            batcher = HopBatcher(send, c.config.max_hop_batch_rows, 1, c.config.max_hop_queue, name)
            c.hop_batchers[key] = batcher
        replicas = len(placement.spans[0].replicas) if placement.spans else 1
        batcher.max_in_flight = c.config.hops_in_flight_per_replica * max(1, replicas)
        return batcher

    async def submit_job(
        self, name: str, version: str | None, body: bytes, length: int | None, owner: str
    ) -> Job:
        """Check the request as a sync call would, then store it durably (before the 202)."""
        c = self.c
        entry, _ = c.placed(name, version)
        decode_checked_request(body, length, entry.signature, c.config.max_tensor_elements)
        job = Job(uuid.uuid4().hex, name, version, "queued", time.time(), None, body, length, owner)
        await c.jobs.submit(job)
        return job

    async def run_job(self, job: Job) -> tuple[bytes, int | None]:
        current_request_id.set(f"job-{job.id[:16]}")  # this task's log lines and hops
        out, out_length, _ = await self.infer_body(
            job.model, job.version, job.request, job.header_length
        )
        return out, out_length
