"""The floor of HTTP overhead: a plain aiohttp server running onnxruntime per request.

No batching, no validation, no v2 protocol: the body is the raw little-endian bytes of each input
(one sample), the answer the raw bytes of the first output. What is left is aiohttp and
onnxruntime alone.

    python -m bench.floor --onnx model.onnx --tokens 16 [--port 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import numpy as np
import onnxruntime as ort
from aiohttp import web

from runtime.datatypes import numpy_dtype, v2_from_ort_type


def build(onnx_path: str, tokens: int, threads: int) -> web.Application:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    specs = []
    for arg in session.get_inputs():
        dtype = numpy_dtype(v2_from_ort_type(arg.type))
        shape = [
            1 if i == 0 else tokens if not isinstance(d, int) else d
            for i, d in enumerate(arg.shape)
        ]
        specs.append((arg.name, dtype, shape, int(np.prod(shape)) * dtype.itemsize))
    output = session.get_outputs()[0].name

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        feeds, offset = {}, 0
        for name, dtype, shape, size in specs:
            feeds[name] = np.frombuffer(
                body, dtype, offset=offset, count=size // dtype.itemsize
            ).reshape(shape)
            offset += size
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, session.run, [output], feeds)
        return web.Response(body=np.ascontiguousarray(result[0]).tobytes())

    app = web.Application(client_max_size=1 << 26)
    app.add_routes([web.post("/infer", infer)])
    return app


def sample_body(onnx_path: str, feeds: dict[str, np.ndarray]) -> bytes:
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    return b"".join(np.ascontiguousarray(feeds[a.name]).tobytes() for a in session.get_inputs())


async def _serve(args: argparse.Namespace) -> None:
    app = build(args.onnx, args.tokens, args.threads)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    print(f"floor listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
