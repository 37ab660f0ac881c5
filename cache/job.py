"""An asynchronous job (an inference, or a generation answered whole) and its stored form.

Stored as three values under the job id: the metadata (JSON), the request body and, once there
is one, the result body. Bodies stay raw bytes so a multi-megabyte tensor body is never
re-encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from cache.errors import InvalidJob

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
UNFINISHED = frozenset({"queued", "running"})
FINISHED = frozenset(STATUSES) - UNFINISHED


@dataclass
class Job:
    id: str
    model: str
    version: str | None
    status: str  # one of STATUSES
    created: float  # wall-clock seconds (time.time())
    finished: float | None
    request: bytes  # the request body as received (already decompressed)
    header_length: int | None  # its Inference-Header-Content-Length (None: pure JSON)
    owner: str = ""  # who submitted it
    result: bytes | None = None
    result_header_length: int | None = None
    error: str | None = None
    # what the job runs: "infer" (a v2 body), or a generation route ("generate", "completions",
    # "chat_completions": a JSON body, the answer that route gives without streaming)
    kind: str = "infer"

    def public(self) -> dict[str, Any]:
        """What a client may see of the job: no bodies, no owner."""
        view: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "kind": self.kind,
            "status": self.status,
            "created": self.created,
            "finished": self.finished,
        }
        if self.error is not None:
            view["error"] = self.error
        return view

    @property
    def done(self) -> bool:
        return self.status in FINISHED


def check_job(job: Job) -> None:
    """InvalidJob unless ``job`` can be stored (a known status, a non-empty id)."""
    if job.status not in STATUSES:
        raise InvalidJob(
            f"job {job.id!r} has status {job.status!r}; accepted: {', '.join(STATUSES)}"
        )
    if not job.id or len(job.id.encode()) > 256:
        raise InvalidJob(f"job id {job.id!r} must be 1 to 256 bytes of UTF-8")


def encode_meta(job: Job) -> bytes:
    """The job's metadata (everything but the bodies) as JSON."""
    return orjson.dumps(
        {
            "id": job.id,
            "model": job.model,
            "version": job.version,
            "status": job.status,
            "created": job.created,
            "finished": job.finished,
            "header_length": job.header_length,
            "owner": job.owner,
            "result_header_length": job.result_header_length,
            "error": job.error,
            "kind": job.kind,
        }
    )


def decode_meta(raw: bytes, request: bytes, result: bytes | None) -> Job:
    """A job from its stored metadata and bodies."""
    meta = orjson.loads(raw)
    meta.setdefault("kind", "infer")  # stored before generation jobs existed
    return Job(request=request, result=result, **meta)


def meta_status(raw: bytes | memoryview) -> tuple[str, float, float | None]:
    """(status, created, finished) of stored metadata, for scans that need no bodies."""
    meta = orjson.loads(raw)
    return meta["status"], meta["created"], meta["finished"]
