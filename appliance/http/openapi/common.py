"""Building blocks of the OpenAPI document: operations, answers and the error responses."""

from __future__ import annotations

from typing import Any

JSON = "application/json"
BINARY = "application/octet-stream"

_WHY = {
    400: "a malformed request: bad JSON, tensors that do not match the model, bad headers",
    401: "no valid bearer token (auth on); carries WWW-Authenticate",
    403: "a valid token without the admin role this path needs",
    404: "no such model, version, job or route",
    409: "a node holds other bytes of the model than the placement names (a version change)",
    413: "the body is over max_body_bytes, before or after decompression",
    415: "a Content-Encoding other than gzip, deflate or identity",
    429: "this client has max_concurrent_per_client requests in flight already",
    503: "not placed, no live replica, overloaded or a load that timed out; carries Retry-After",
    504: "the request's deadline (its timeout parameter, else request_timeout_s) passed",
    507: "the ring's nodes cannot hold what is asked (memory, replicas): not worth retrying",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


PREFER = {
    "name": "Prefer",
    "in": "header",
    "description": "respond-async: answer 202 with a job (RFC 7240; other preferences "
    "are ignored, a malformed header is a 400)",
    "schema": {"type": "string", "enum": ["respond-async"]},
}
CACHE_CONTROL = {
    "name": "Cache-Control",
    "in": "header",
    "description": "no-cache: not answered from the result cache; no-store: not kept",
    "schema": {"type": "string", "enum": ["no-cache", "no-store", "no-cache, no-store"]},
}


def accepted_job() -> dict[str, Any]:
    """The 202 of ``Prefer: respond-async``: the job, where to poll it."""
    return {
        "description": "Prefer: respond-async: the job is durably queued",
        "headers": {
            "Location": {
                "required": True,
                "schema": {"type": "string", "pattern": "^/v2/jobs/[0-9a-f]+$"},
            },
            "Preference-Applied": {"required": True, "schema": {"type": "string"}},
        },
        "content": _json(_ref("Job")),
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _errors(*statuses: int, prefix: str = "E") -> dict[str, Any]:
    """References to the shared error answers: E (``{"error": "..."}``) or, on the
    OpenAI-compatible routes, O (``{"error": {"message", "type", "param", "code"}}``)."""
    return {str(s): {"$ref": f"#/components/responses/{prefix}{s}"} for s in statuses}


def _path(*names: str) -> list[dict[str, Any]]:
    return [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for n in names
    ]


def _op(
    summary: str,
    ok: dict[str, Any],
    errors: tuple[int, ...],
    *,
    role: str = "infer",
    path: tuple[str, ...] = (),
    headers: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    accepted: dict[str, Any] | None = None,
    errors_as: str = "E",
) -> dict[str, Any]:
    """One operation; ``role`` adds the auth answers (none for open paths, 403 for admin ones)
    and 429 from the per-client limit (every path but health)."""
    extra: tuple[int, ...] = {"health": (), "open": (), "infer": (401,), "admin": (401, 403)}[role]
    if role != "health":
        extra += (429,)
    op: dict[str, Any] = {"summary": summary}
    if role in ("open", "health"):
        op["security"] = []
    if path or headers:
        op["parameters"] = [*_path(*path), *(headers or [])]
    if body is not None:
        op["requestBody"] = body
    op["responses"] = {
        "200": ok,
        **({"202": accepted} if accepted else {}),
        **_errors(*sorted({*errors, *extra}), prefix=errors_as),
    }
    return op


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": _json(schema)}


def _obj(required: list[str], **properties: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:  # OpenAPI 3.0 takes no empty list here
        schema = {"type": "object", "required": required, "properties": properties}
    return schema


_STR = {"type": "string"}
_OPTIONAL_JSON = {
    "required": False,
    "description": "empty, or a JSON object",
}


def _responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for prefix, schema in (("E", "Error"), ("O", "OpenAIError")):
        for status, why in _WHY.items():
            response: dict[str, Any] = {"description": why, "content": _json(_ref(schema))}
            if status in (429, 503):
                response["headers"] = _RETRY_AFTER
            if status == 401:
                response["headers"] = {
                    "WWW-Authenticate": {"required": True, "schema": {"type": "string"}}
                }
            responses[f"{prefix}{status}"] = response
    return responses
