"""Schemathesis against a live coordinator and node over loopback HTTP, for every operation of
docs/openapi.yaml: no 5xx, no crash, every answer as documented (status, content type, headers,
body schema), and the coordinator still alive and ready afterwards.

Cases come from the document (schema-valid and schema-violating ones, model names at random and
pinned to the placed model) and from a strategy of well-formed requests for the placed model, so
that fuzzing reaches inference, the result cache and async jobs, not only the 404 of an unknown
name. Loading and unloading the placed model are left out (the same parsing is reached with
other names, and an unload would make the later 503s legitimate). Generation is derandomized:
CI sends the same cases every run, but for job ids and what timing decides.
"""

from __future__ import annotations

import contextlib
import json
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok

from appliance.errors import ApplianceError
from appliance.http.body import decompress
from runtime.codec import encode_request
from tests.integration.test_ring import SMALL, make_repo
from tests.support.harness import Ring, http
from tests.support.tiny_llm import shared_tiny_package

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
MODEL = "demo"
LLM = "tiny-llm"  # a tiny generation model: fuzzing reaches the token loop
HEADER = "Inference-Header-Content-Length"
JSON = "application/json"
EXAMPLES = 40  # per operation and strategy: both tests take under a minute on 2 cores
ADMIN, USER = "a" * 32, "u" * 32  # auth pass: an admin and an infer token
# whatever a response is, these must hold (the 5xx rule is checked by hand, with its one exception)
CHECKS = [
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


Strategy = st.SearchStrategy[schemathesis.Case]
T = TypeVar("T")


@dataclass
class Tally:
    """Every request made and what came back; failures by a short key, one example each."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[tuple[str, int]] = field(default_factory=Counter)
    server_errors: int = 0
    client_deadlines: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    job_ids: list[str] = field(default_factory=list)

    def fail(self, key: str, detail: str) -> None:
        self.failures.setdefault(key, detail[:3000])


def client_deadline(case: schemathesis.Case) -> bool:
    """The request named its own deadline (the ``timeout`` parameter, in microseconds), one
    short enough to pass before a tiny model answers on loopback: under a second."""
    body, headers = case.body, dict(case.headers or {})
    try:
        if isinstance(body, bytes):  # compressed, or binary tensor data after its JSON part
            encoding = headers.get("Content-Encoding", "identity")
            if encoding != "identity":
                body = decompress(body, encoding, 1 << 30)
            body = json.loads(body[: int(headers.get(HEADER, len(body)))])
    except (ValueError, ApplianceError):
        return False
    parameters = body.get("parameters") if isinstance(body, dict) else None
    timeout = parameters.get("timeout") if isinstance(parameters, dict) else None
    return isinstance(timeout, int | float) and timeout < 1_000_000


def run_case(
    case: schemathesis.Case,
    ring: Ring,
    tally: Tally,
    headers: dict[str, str],
    auth: Callable[[schemathesis.Case, dict[str, str], int], str | None] | None = None,
) -> None:
    label = case.operation.label
    tally.requests += 1
    try:
        response = case.call(base_url=ring.url, headers=headers, timeout=30)
    except requests.RequestException as exc:  # no answer at all: a hang or a crash
        tally.fail(f"{label}: no answer", f"{type(exc).__name__}: {exc}\n{case.as_curl_command()}")
        return
    status = response.status_code
    tally.statuses[status] += 1
    tally.by_operation[label, status] += 1
    if status >= 500:
        # 504 is the answer a request gets when its own (tiny) timeout passed; nothing else
        if status == 504 and client_deadline(case):
            tally.client_deadlines += 1
        else:
            tally.server_errors += 1
            tally.fail(
                f"{label}: {status}",
                f"{status} {response.text[:500]}\n{case.as_curl_command(headers=headers)}",
            )
    if status == 202:
        tally.job_ids.append(response.json()["id"])
    if auth is not None and (why := auth(case, headers, status)) is not None:
        tally.fail(f"{label}: auth {why}", case.as_curl_command(headers=headers))
    try:
        case.validate_response(response, checks=CHECKS, headers=headers)
    except FailureGroup as group:
        for failure in group.exceptions:
            tally.fail(
                f"{label}: {failure.title} ({status})",
                f"{failure.message}\n{case.as_curl_command(headers=headers)}",
            )


def explore(strategy: st.SearchStrategy[T], examples: int, run: Callable[[T], None]) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],  # failures are collected, not shrunk
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def property_(case: T) -> None:
        run(case)

    # a negative mode has nothing to violate on an operation without parameters or body
    with contextlib.suppress(Unsatisfiable):
        property_()


def well_formed_generation(
    operation: schemathesis.APIOperation,
) -> st.SearchStrategy[schemathesis.Case]:
    """Completions, chats and Triton generate requests for the tiny model: sampling fields in
    range and out of it, short and empty prompts, streamed or not, within the token cap."""
    text = st.text(max_size=30)
    sampling = st.fixed_dictionaries(
        {},
        optional={
            "max_tokens": st.integers(-2, 12),
            "temperature": st.one_of(st.floats(0, 2), st.just(-1.0)),
            "top_p": st.floats(0, 1.5),
            "top_k": st.integers(-1, 50),
            "seed": st.integers(0, 2**63 - 1),
            "stop": st.one_of(st.none(), text, st.lists(text, max_size=5)),
            "ignore_eos": st.booleans(),
        },
    )
    if operation.path.startswith("/v2/models/"):
        body = st.builds(lambda t, p: {"text_input": t, "parameters": p}, text, sampling)
        path = {"model": LLM}
    else:
        chat = operation.path.endswith("/chat/completions")
        turn = st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant", "robot"]), "content": text}
        )
        prompt = st.lists(turn, min_size=0, max_size=3) if chat else text
        streaming = st.fixed_dictionaries({}, optional={"stream": st.booleans()})
        body = st.builds(
            lambda p, s, f: {"model": LLM, "messages" if chat else "prompt": p, **s, **f},
            prompt,
            sampling,
            streaming,
        )
        path = {}
    return body.flatmap(
        lambda b: operation.as_strategy(path_parameters=path, body=b, media_type=JSON)
    )


def well_formed_infer(
    operation: schemathesis.APIOperation, path: dict[str, str]
) -> st.SearchStrategy[schemathesis.Case]:
    """Requests for the demo model (input_ids INT64 [batch, sequence]) in JSON and binary form:
    token ids mostly in the vocabulary and sometimes anywhere in int64; any request id, named
    outputs (real or not), the parameters and headers the server honours, or none of them."""
    token = st.integers(0, SMALL["vocab"] - 1)
    anything = st.integers(-(2**63), 2**63 - 1)  # mostly outside the vocabulary: a 400
    ids = st.lists(token, min_size=1, max_size=12) | st.lists(token | anything, min_size=1)
    request_id = st.one_of(st.text(max_size=40), st.text(min_size=5000, max_size=10_000))
    output = st.fixed_dictionaries(
        {"name": st.one_of(st.just("last_hidden_state"), st.text(max_size=10))},
        optional={"parameters": st.fixed_dictionaries({"binary_data": st.booleans()})},
    )
    top = st.fixed_dictionaries(
        {},
        optional={
            "id": request_id,
            "outputs": st.lists(output, max_size=2),
            "parameters": st.fixed_dictionaries(
                {},
                optional={
                    "binary_data_output": st.booleans(),
                    "timeout": st.one_of(st.integers(1, 2000), st.just(30_000_000)),
                },
            ),
        },
    )
    preferences = st.fixed_dictionaries(
        {},
        optional={
            "Prefer": st.sampled_from(
                ["respond-async", "respond-async, wait=5", "handling=lenient"]
            ),
            "Cache-Control": st.sampled_from(["no-cache", "no-store", "no-cache, no-store"]),
        },
    )

    encoding = st.sampled_from(["identity", "gzip", "deflate"])

    def case(
        body: dict[str, Any] | bytes, length: int | None, encoding: str, headers: dict[str, str]
    ) -> st.SearchStrategy[schemathesis.Case]:
        headers = {**headers, "Content-Encoding": encoding}  # else one is drawn at random
        if length is not None:
            headers[HEADER] = str(length)
        if encoding != "identity":
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            packer = zlib.compressobj(wbits=31 if encoding == "gzip" else 15)
            body = packer.compress(raw) + packer.flush()
        return operation.as_strategy(
            path_parameters=path,
            headers=headers,
            body=body,
            media_type="application/octet-stream" if isinstance(body, bytes) else JSON,
        )

    def json_case(
        values: list[int], batch: int, body: dict[str, Any]
    ) -> tuple[dict[str, Any], None]:
        row = len(values) // batch or 1
        data = (values * batch)[: row * batch]
        tensor = {"name": "input_ids", "datatype": "INT64", "shape": [batch, row], "data": data}
        return {**body, "inputs": [tensor]}, None

    def binary_case(values: list[int], body: dict[str, Any], cut: int) -> tuple[bytes, int]:
        raw, length = encode_request(
            {"input_ids": np.array([values], dtype=np.int64)},
            request_id=body.get("id"),
            parameters=body.get("parameters"),
        )
        assert length is not None
        return raw[: len(raw) - cut], length  # a cut tail: fewer bytes than the tensors say

    bodies = st.one_of(
        st.builds(json_case, ids, st.integers(1, 3), top),
        st.builds(binary_case, ids, top, st.sampled_from([0, 0, 1, 8])),
    )
    return st.tuples(bodies, encoding, preferences).flatmap(
        lambda a: case(a[0][0], a[0][1], a[1], a[2])
    )


def fuzz(
    ring: Ring,
    version: str,
    headers: Callable[[], st.SearchStrategy[dict[str, str]]],
    examples: int,
    auth: Callable[[schemathesis.Case, dict[str, str], int], str | None] | None = None,
) -> Tally:
    # the test sets Authorization itself: schemathesis would drop it from negative cases
    config = schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}})
    schema = schemathesis.openapi.from_path(DOC, config=config)
    schema.validate()
    tally = Tally()
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert len(operations) == len(list(schema.get_all_operations())), "an invalid operation"
    jobs = [op for op in operations if op.path.startswith("/v2/jobs/")]
    placed = {"model": MODEL, "version": version}

    def strategies(op: schemathesis.APIOperation) -> list[tuple[Strategy, int]]:
        """(cases, how many) for one operation."""
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
        found = [(op.as_strategy(generation_mode=mode), examples) for mode in modes]
        names = {p.name for p in op.path_parameters}
        generation = op.path.endswith(("/generate", "/generate_stream", "/completions"))
        if generation:
            found.append((well_formed_generation(op), examples // 2))
        if "model" in names and "/repository/" not in op.path:
            pinned = {k: v for k, v in placed.items() if k in names}
            if generation:
                pinned = {"model": LLM}
            for mode in modes:
                found.append(
                    (op.as_strategy(generation_mode=mode, path_parameters=pinned), examples)
                )
            if op.path.endswith("/infer"):  # where the work is: the most cases
                found.append((well_formed_infer(op, pinned), 3 * examples))
        return found

    def run_all(ops: list[schemathesis.APIOperation], extra: Callable[..., list[Any]]) -> None:
        for op in ops:
            for strategy, count in [*strategies(op), *extra(op)]:
                explore(
                    st.tuples(strategy, headers()),
                    count,
                    lambda pair: run_case(pair[0], ring, tally, pair[1], auth),
                )

    run_all([op for op in operations if op not in jobs], lambda op: [])
    # then the jobs the fuzzing above submitted: polled, fetched and cancelled for real
    known = st.sampled_from(tally.job_ids or ["none"])
    run_all(
        jobs,
        lambda op: [
            (known.flatmap(lambda j: op.as_strategy(path_parameters={"job": j})), examples)
        ],
    )
    return tally


def still_serving(ring: Ring) -> None:
    assert ring.coordinator is not None and ring.coordinator.poll() is None, "coordinator died"
    assert all(node.poll() is None for node in ring.nodes.values()), "a node died"
    status, body = http("GET", ring.url + "/v2/health/ready", timeout=10)
    assert status == 200, body


def report(tally: Tally, took: float) -> str:
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(tally.statuses.items()))
    return (
        f"{tally.requests} requests in {took:.1f}s; statuses {statuses}; "
        f"{tally.server_errors} server errors; {tally.client_deadlines} 504s for a client's own "
        f"timeout; {len(tally.job_ids)} jobs"
    )


def start(tmp_path: Path, coordinator: list[str], node: list[str]) -> Ring:
    repo = make_repo(tmp_path / "repo")
    (repo / LLM).symlink_to(shared_tiny_package() / LLM)  # read-only, exported once
    ring = Ring(tmp_path, repo)
    ring.start_coordinator(*coordinator, "--max-tokens-limit", "16")  # short answers: fast
    ring.start_node("a", *node)
    return ring


def placed_version(ring: Ring, token: str | None = None) -> str:
    request = requests.get(
        f"{ring.url}/v2/models/{MODEL}",
        headers={"Authorization": f"Bearer {token}"} if token else {},
        timeout=10,
    )
    assert request.status_code == 200, request.text
    return str(request.json()["versions"][0])


@pytest.fixture
def open_ring(tmp_path: Path) -> Iterator[Ring]:
    ring = start(tmp_path, [], [])
    try:
        ring.wait_members(1)
        ring.load(MODEL, stages=1, replicas=1)
        ring.load(LLM, stages=1, replicas=1)
        ring.wait_ready()
        yield ring
    finally:
        ring.stop()


def test_fuzzing_every_operation_finds_no_server_error(open_ring: Ring) -> None:
    started = time.monotonic()
    tally = fuzz(open_ring, placed_version(open_ring), lambda: st.just({}), EXAMPLES)
    print(report(tally, time.monotonic() - started))
    assert not tally.failures, "\n\n".join(f"{k}\n{v}" for k, v in tally.failures.items())
    assert tally.server_errors == 0
    assert tally.statuses[200] and tally.statuses[202] and tally.statuses[400]
    assert tally.by_operation["GET /v2/jobs/{job}/result", 200], "no job result was fetched"
    for route in ("/v1/completions", "/v1/chat/completions", "/v2/models/{model}/generate"):
        assert tally.by_operation[f"POST {route}", 200], f"no generation reached by {route}"
    still_serving(open_ring)


def test_fuzzing_with_auth_on_answers_401_and_403_as_documented(tmp_path: Path) -> None:
    tokens = ["--tokens", f"admin:{ADMIN}", f"infer:{USER}", "--cluster-token", ADMIN]
    ring = start(tmp_path, tokens, ["--tokens", f"admin:{ADMIN}", "--cluster-token", ADMIN])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the node has joined
            load = requests.post(
                f"{ring.url}/v2/repository/models/{MODEL}/load",
                json={"parameters": {"stages": 1}},
                headers={"Authorization": f"Bearer {ADMIN}"},
                timeout=60,
            )
            if load.status_code == 200:
                break
            time.sleep(0.2)
        load = requests.post(
            f"{ring.url}/v2/repository/models/{LLM}/load",
            json={"parameters": {"stages": 1}},
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=60,
        )
        assert load.status_code == 200, load.text
        ring.wait_ready()
        roles = {"admin": ADMIN, "infer": USER, "wrong": "w" * 32}
        # mostly tokens that pass, so that the fuzzing behind auth is reached too
        presented = st.sampled_from(["admin", "admin", "infer", None, "wrong"]).map(
            lambda role: {"Authorization": f"Bearer {roles[role]}"} if role else {}
        )

        def auth(case: schemathesis.Case, headers: dict[str, str], status: int) -> str | None:
            """The status auth must give: 401 without a valid token, 403 for an infer token on
            an admin path, and neither where the token is good enough or the path open."""
            token = headers.get("Authorization", "")
            sent = {f"Bearer {v}": k for k, v in roles.items()}.get(token)
            open_path = case.operation.path in ("/", "/v2/health/live", "/v2/health/ready")
            admin_path = case.operation.path.startswith(("/v2/repository/", "/v2/cluster"))
            admin_path |= case.operation.path == "/metrics"
            admin_path |= case.operation.path.endswith("/stats")
            if open_path or sent == "admin":
                want = {200, 202, 400, 404, 409, 413, 415, 429, 503, 504}
            elif sent in (None, "wrong"):
                want = {401}
            else:
                want = {403} if admin_path else {200, 202, 400, 404, 409, 413, 415, 429, 504}
            return None if status in want else f"{sent or 'no'} token: {status}"

        started = time.monotonic()
        tally = fuzz(ring, placed_version(ring, ADMIN), lambda: presented, EXAMPLES // 2, auth)
        print(report(tally, time.monotonic() - started))
        assert not tally.failures, "\n\n".join(f"{k}\n{v}" for k, v in tally.failures.items())
        assert tally.server_errors == 0
        assert tally.statuses[401] and tally.statuses[403] and tally.statuses[200]
        still_serving(ring)
    finally:
        ring.stop()
