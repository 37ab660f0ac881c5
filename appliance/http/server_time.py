"""Internal answers say what they cost the callee, so the caller can tell its link's share of
a call from the work done at the other end (``appliance.ring.links``)."""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.typedefs import Handler

from appliance.headers import COMPUTE_TIME, SERVER_TIME

# a handler that runs a span files its own compute seconds here (its answer's COMPUTE_TIME)
COMPUTE_SECONDS = web.RequestKey("compute_s", float)


@web.middleware
async def server_time_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time from the whole body being in to the answer being ready; the body is read first (a
    signature check has usually read it already: then this costs nothing)."""
    await request.read()
    start = time.perf_counter()
    response = await handler(request)
    if not response.prepared:
        response.headers[SERVER_TIME] = f"{time.perf_counter() - start:.6f}"
        compute = request.get(COMPUTE_SECONDS)
        if compute is not None:
            response.headers[COMPUTE_TIME] = f"{compute:.6f}"
    return response
