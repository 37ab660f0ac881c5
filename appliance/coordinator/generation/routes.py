"""Generation routes: Triton's generate extension and the OpenAI-compatible API, streamed as
server-sent events or answered whole. Handlers parse, call the token loop, serialise."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from appliance.coordinator.async_jobs import RunJob
from appliance.coordinator.generation import shapes
from appliance.coordinator.generation.requests import (
    GenerationRequest,
    chat_request,
    completion_request,
    triton_request,
)
from appliance.coordinator.generation.run import Chunk, GenerationRun
from appliance.coordinator.generation.streams import sse
from appliance.coordinator.inference import request_id
from appliance.coordinator.keys import coordinator_of
from appliance.coordinator.request_policy import parse_cache_control, wants_async
from appliance.coordinator.service import Coordinator
from appliance.errors import BadRequest
from appliance.http.v2 import json_response, read_json_object
from appliance.security.auth import caller_of
from cache.job import Job
from runtime.errors import ModelNotFound


def _start(
    coordinator: Coordinator,
    request: GenerationRequest,
    http: web.Request | None = None,
) -> GenerationRun:
    """The run of ``request``; with the HTTP request it answers, that request's
    Cache-Control, and a client that goes away stops it before its next step."""
    entry, placement = coordinator.placed(request.model)
    if not entry.manifest.is_generation:
        raise BadRequest(
            f"model {request.model} is a single-pass model: use /v2/models/{request.model}/infer"
        )
    control = parse_cache_control(http.headers.get("Cache-Control")) if http else None

    def gone() -> bool:
        transport = http.transport if http is not None else None
        return http is not None and (transport is None or transport.is_closing())

    return GenerationRun(
        coordinator, entry, placement, coordinator.text_of(entry), request, request_id(),
        control, gone,
    )  # fmt: skip


def _defaults(coordinator: Coordinator, name: str) -> dict[str, Any]:
    entry = coordinator.entry(name)
    info = entry.manifest.generation
    if info is None:
        raise BadRequest(
            f"model {name} is a single-pass model: it takes /v2/models/{name}/infer, not "
            "generation requests"
        )
    return dict(info.defaults)


async def _body(request: web.Request) -> dict[str, Any]:
    return await read_json_object(request)


async def _collect(run: GenerationRun) -> tuple[str, str | None, list[int]]:
    text, finish, ids = [], None, []
    chunks = run.chunks()
    try:
        async for chunk in chunks:
            text.append(chunk.text)
            ids += chunk.token_ids
            finish = chunk.finish_reason or finish
    finally:
        await chunks.aclose()  # its sequence is closed now, not when it is collected
    return "".join(text), finish, ids


# --- Triton's generate extension -----------------------------------------------------------


async def generate(request: web.Request) -> web.StreamResponse:
    coordinator = coordinator_of(request)
    name = request.match_info["model"]
    body = await _body(request)
    stream = request.path.endswith("/generate_stream")
    limit = coordinator.config.max_tokens_limit
    parsed = triton_request(name, body, limit, _defaults(coordinator, name), stream)
    if wants_async(request.headers.get("Prefer")):
        return await _submit(request, "generate", name, parsed)
    run = _start(coordinator, parsed, request)
    head = {"model_name": name, "model_version": run.entry.version}
    if not stream:
        text, _, _ = await _collect(run)
        return json_response({**head, "text_output": text})
    return await sse(request, run, lambda c: {**head, "text_output": c.text}, done=False)


# --- OpenAI-compatible -----------------------------------------------------------------------


async def models(request: web.Request) -> web.Response:
    coordinator = coordinator_of(request)
    served = []
    for name in sorted(coordinator.placements):
        try:
            entry = coordinator.entry(name)
        except ModelNotFound:
            continue
        if entry.manifest.is_generation:
            created = int(entry.package.folder.stat().st_mtime)
            served.append(shapes.model_card(name, created))
    return json_response({"object": "list", "data": served})


async def completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, completion_request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, chat_request, chat=True)


Parser = Callable[[dict[str, Any], int, dict[str, Any]], GenerationRequest]


async def _openai(request: web.Request, parse: Parser, chat: bool) -> web.StreamResponse:
    coordinator = coordinator_of(request)
    body = await _body(request)
    name = body.get("model")
    if isinstance(name, str) and name:
        try:
            coordinator.entry(name)
        except ModelNotFound as exc:
            raise ModelNotFound(f"the model {name!r} does not exist: {exc}") from exc
        defaults = _defaults(coordinator, name)
    else:
        defaults = {}
    parsed = parse(body, coordinator.config.max_tokens_limit, defaults)
    if wants_async(request.headers.get("Prefer")):
        return await _submit(request, "chat_completions" if chat else "completions",
                             parsed.model, parsed)  # fmt: skip
    run = _start(coordinator, parsed, request)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if not parsed.stream:
        text, finish, ids = await _collect(run)
        return json_response(
            shapes.completion(
                ident,
                created,
                parsed.model,
                text,
                finish,
                run.usage,
                chat,
                ids if parsed.return_token_ids else None,
            )  # fmt: skip
        )
    first = [True]

    def event(chunk: Chunk) -> dict[str, Any] | None:
        payload = shapes.chunk(
            ident, created, parsed.model, chunk, chat, first[0], parsed.return_token_ids
        )
        first[0] = False
        return payload

    def last() -> list[dict[str, Any]]:
        if not parsed.include_usage:
            return []
        return [shapes.usage_chunk(ident, created, parsed.model, run.usage, chat)]

    return await sse(request, run, event, last)


# --- asynchronous generation: a durable job answered whole -----------------------------------


async def _submit(
    request: web.Request, kind: str, model: str, parsed: GenerationRequest
) -> web.Response:
    """Store the request (checked as a sync call would be) before the 202."""
    if parsed.stream:
        raise BadRequest(
            "a streamed request cannot be asynchronous: drop Prefer: respond-async, or ask "
            "without streaming and poll the job"
        )
    coordinator = coordinator_of(request)
    _start(coordinator, parsed)  # 404 / 503 / 400 now, not in the job
    body = await request.read()
    job = Job(uuid.uuid4().hex, model, None, "queued", time.time(), None, body, None,
              caller_of(request).id, kind=kind)  # fmt: skip
    await coordinator.jobs.submit(job)
    response = json_response(job.public(), status=202)
    response.headers["Location"] = f"/v2/jobs/{job.id}"
    response.headers["Preference-Applied"] = "respond-async"
    return response


def generation_jobs(coordinator: Coordinator) -> dict[str, RunJob]:
    """How the job runner runs each kind of generation job: the route's answer, whole."""

    async def generate(job: Job) -> tuple[bytes, int | None]:
        body = orjson.loads(job.request)
        limit = coordinator.config.max_tokens_limit
        parsed = triton_request(job.model, body, limit, _defaults(coordinator, job.model), False)
        run = _start(coordinator, parsed)
        text, _, _ = await _collect(run)
        head = {"model_name": job.model, "model_version": run.entry.version}
        return orjson.dumps({**head, "text_output": text}), None

    def openai(parse: Parser, chat: bool) -> RunJob:
        async def run_job(job: Job) -> tuple[bytes, int | None]:
            body = orjson.loads(job.request)
            parsed = parse(body, coordinator.config.max_tokens_limit,
                           _defaults(coordinator, job.model))  # fmt: skip
            run = _start(coordinator, parsed)
            text, finish, ids = await _collect(run)
            ident = f"{'chatcmpl' if chat else 'cmpl'}-{job.id}"
            answer = shapes.completion(ident, int(job.created), parsed.model, text, finish,
                                       run.usage, chat,
                                       ids if parsed.return_token_ids else None)  # fmt: skip
            return orjson.dumps(answer), None

        return run_job

    return {
        "generate": generate,
        "completions": openai(completion_request, False),
        "chat_completions": openai(chat_request, True),
    }


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/v2/models/{model}/generate", generate),
    ("POST", "/v2/models/{model}/generate_stream", generate),
    ("GET", "/v1/models", models),
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat_completions),
]
