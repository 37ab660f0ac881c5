"""Reading request bodies: size limit, gzip/deflate decoding, and the limit again after it."""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

from appliance.errors import BadRequest, BodyTooLarge, UnsupportedMediaType

# Decompressing a large body blocks the event loop; past this size it runs on a thread.
_INLINE_DECOMPRESS_BYTES = 256 * 1024


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, decoded per Content-Encoding, never larger than ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"request body of {request.content_length} bytes exceeds the limit of {limit} bytes"
        )
    raw = await request.read()  # aiohttp enforces client_max_size (= limit) while reading
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; accepted: gzip, deflate, identity"
        )
    if len(raw) > _INLINE_DECOMPRESS_BYTES:
        return await asyncio.to_thread(decompress, raw, encoding, limit)
    return decompress(raw, encoding, limit)


def decompress(raw: bytes, encoding: str, limit: int) -> bytes:
    """gzip, or deflate (zlib-wrapped as HTTP says; raw deflate also taken), capped at limit."""
    wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
    try:
        return _inflate(raw, wbits, limit, encoding)
    except zlib.error as exc:
        if encoding == "deflate":  # some clients send raw deflate without the zlib wrapper
            try:
                return _inflate(raw, -zlib.MAX_WBITS, limit, encoding)
            except zlib.error:
                pass
        raise BadRequest(f"request body is not valid {encoding} data: {exc}") from exc


def _inflate(raw: bytes, wbits: int, limit: int, encoding: str) -> bytes:
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(raw, limit + 1)
    if len(out) > limit or inflater.unconsumed_tail:
        raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes once decompressed")
    out += inflater.flush()
    if len(out) > limit:
        raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes once decompressed")
    if not inflater.eof:
        raise BadRequest(f"request body is truncated {encoding} data")
    if inflater.unused_data:
        raise BadRequest(
            f"request body has {len(inflater.unused_data)} bytes after its {encoding} data"
        )
    return out
