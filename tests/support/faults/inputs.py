"""Bad input: malformed requests of every kind, interleaved with good ones, to a live
coordinator."""

from __future__ import annotations

import gzip
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.codec import encode_request
from tests.support.faults.common import (
    HEADER,
    NO_CACHE,
    FaultRecord,
    Tally,
    answer_matches,
    infer_request,
    post,
    reference,
    ring_of,
    token_rows,
)
from tests.support.harness import http

# --- bad input -------------------------------------------------------------------------------

GOOD_JSON = {
    "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]}]
}
BODY_LIMIT = 64 * 1024
MAX_ELEMENTS = 4096


def _json_with(**changes: Any) -> bytes:
    return json.dumps({"inputs": [{**GOOD_JSON["inputs"][0], **changes}]}).encode()


def _binary(rows: int = 1, tokens: int = 4) -> tuple[bytes, int]:
    body, length = encode_request({"input_ids": np.ones((rows, tokens), np.int64)})
    assert length is not None
    return body, length


def _binary_with_length(rows: int, tokens: int) -> tuple[bytes, dict[str, str]]:
    body, length = _binary(rows, tokens)
    return body, {HEADER: str(length)}


@dataclass(frozen=True)
class BadInput:
    name: str
    body: bytes
    headers: dict[str, str]
    expected: int
    model: str = "demo"


def bad_inputs() -> list[BadInput]:
    """One malformed request of each kind and the 4xx each must get (docs/api.md, errors)."""
    body, length = _binary()
    big, big_length = _binary(1, BODY_LIMIT // 8 + 1024)  # binary int64 over the body limit
    bomb, bomb_length = _binary(1, BODY_LIMIT)  # 512 KiB of zeros' worth once inflated
    json_type = {"Content-Type": "application/json"}
    return [
        BadInput("invalid JSON", b'{"inputs": [', json_type, 400),
        BadInput("JSON that is not an object", b"[1, 2, 3]", json_type, 400),
        BadInput("wrong datatype (INT32 for INT64)", _json_with(datatype="INT32"), json_type, 400),
        BadInput("unknown datatype", _json_with(datatype="FLOAT"), json_type, 400),
        BadInput("shape that does not match the data", _json_with(shape=[2, 4]), json_type, 400),
        BadInput("wrong rank", _json_with(shape=[4]), json_type, 400),
        BadInput("unknown model", json.dumps(GOOD_JSON).encode(), json_type, 404, "nope"),
        BadInput("unknown input name", _json_with(name="ids"), json_type, 400),
        BadInput("no inputs", b'{"inputs": []}', json_type, 400),
        BadInput(
            "token id out of the vocabulary", _json_with(data=[1, 2, 3, 10**9]), json_type, 400
        ),
        BadInput(
            "bad timeout parameter",
            json.dumps({**GOOD_JSON, "parameters": {"timeout": "soon"}}).encode(),
            json_type,
            400,
        ),
        BadInput("body over the limit", big, {HEADER: str(big_length)}, 413),
        BadInput(
            "gzip bomb (over the limit once inflated)",
            gzip.compress(bomb),
            {HEADER: str(bomb_length), "Content-Encoding": "gzip"},
            413,
        ),
        BadInput("corrupt gzip", b"not gzip at all", {"Content-Encoding": "gzip"}, 400),
        BadInput(
            "unsupported Content-Encoding",
            body,
            {HEADER: str(length), "Content-Encoding": "br"},
            415,
        ),
        BadInput("binary header length past the body", body, {HEADER: str(len(body) + 1)}, 400),
        BadInput("binary header length not a number", body, {HEADER: "abc"}, 400),
        BadInput("binary header length negative", body, {HEADER: "-5"}, 400),
        BadInput("binary data shorter than its shape", body[:-8], {HEADER: str(length)}, 400),
        BadInput("binary data longer than its shape", body + b"\0" * 8, {HEADER: str(length)}, 400),
        BadInput(
            "tensor over max_tensor_elements",
            *_binary_with_length(1, MAX_ELEMENTS + 1),
            413,
        ),
        BadInput(
            "declared shape of 10^12 elements, tiny body",
            _json_with(shape=[1_000_000, 1_000_000], data=[1]),
            json_type,
            413,
        ),
    ]


def bad_input_flood(work: Path, per_kind: int = 20, concurrency: int = 8) -> list[FaultRecord]:
    """``per_kind`` requests of every bad kind, each followed by a good request, sent from
    ``concurrency`` threads to a live coordinator: every bad one must get its 4xx with a JSON
    error, every good one a correct 200, and both processes must stay up."""
    kinds = bad_inputs()
    started = time.perf_counter()
    limits = ("--max-body-bytes", str(BODY_LIMIT), "--max-tensor-elements", str(MAX_ELEMENTS))
    with ring_of(work, ["a"], 1, 1, *limits) as ring:
        tallies, good = _send_interleaved(ring.url, kinds * per_kind, concurrency)
        alive = all(p.poll() is None for p in [ring.coordinator, *ring.nodes.values()] if p)
        alive = alive and http("GET", ring.url + "/v2/health/ready")[0] == 200
    seconds = round(time.perf_counter() - started, 1)
    records = [_bad_record(kind, tallies[kind.name], per_kind, seconds) for kind in kinds]
    interleaved = FaultRecord(
        "good requests interleaved with the bad ones",
        f"{good.sent:,} requests, one after each bad one, concurrency {concurrency}",
        seconds=seconds,
        group="bad input",
    )
    interleaved.count(good)
    interleaved.details = {"processes_alive": alive}
    interleaved.outcome = (
        f"{good.ok}/{good.sent} correct; coordinator and node {'up' if alive else 'DOWN'} after"
    )
    return [*records, interleaved]


def _send_interleaved(
    url: str, items: list[BadInput], concurrency: int
) -> tuple[dict[str, Tally], Tally]:
    """Each bad request then a good one, from ``concurrency`` threads; tallies by kind, and
    the good requests' tally."""
    good_ids = token_rows(1, 4)[0]
    good_body, good_headers = infer_request(good_ids)
    want = reference(good_ids)
    tallies = {item.name: Tally() for item in items}
    good = Tally()
    lock = threading.Lock()
    queue = iter(items)

    def worker() -> None:
        for kind in queue:  # one shared iterator: each item is taken by one thread
            answer = post(f"{url}/v2/models/{kind.model}/infer", kind.body, kind.headers)
            fine = answer.status == kind.expected and _is_json_error(answer.body)
            ok = post(f"{url}/v2/models/demo/infer", good_body, {**good_headers, **NO_CACHE})
            with lock:
                tallies[kind.name].add(answer, fine)
                good.add(ok, answer_matches(ok, want))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tallies, good


def _is_json_error(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body).get("error"), str)
    except (ValueError, AttributeError):
        return False


def _bad_record(kind: BadInput, tally: Tally, per_kind: int, seconds: float) -> FaultRecord:
    record = FaultRecord(kind.name, f"{per_kind} requests", seconds=seconds, group="bad input")
    record.count(tally)
    got = ", ".join(f"{n}x{status}" for status, n in sorted(tally.statuses.items()))
    record.outcome = f"{got} (expected {kind.expected}, JSON error)"
    record.details = {"expected": kind.expected, "statuses": dict(tally.statuses)}
    if tally.errors:
        record.details["first_unexpected"] = tally.errors[:2]
    return record
