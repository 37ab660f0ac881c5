"""Request ids on every log line about a request, the access log, JSON lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import aiohttp
import pytest

from appliance.config import NodeConfig
from appliance.http.logs import _JsonFormatter, _RequestIdFilter
from appliance.http.server import start_app
from appliance.node.server import build_node_app
from tests.models import dense_model, put_model


async def test_the_access_log_and_answers_carry_the_request_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    put_model(tmp_path, "dense", dense_model())
    app = build_node_app(NodeConfig(model_repo=str(tmp_path), port=0, intra_op_threads=1))
    runner, port = await start_app(app, "127.0.0.1", 0, access_log=True)
    caplog.set_level(logging.INFO, logger="appliance.access")
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(
                f"http://127.0.0.1:{port}/v2/models/nope", headers={"X-Request-Id": "abc123"}
            ) as response:
                assert response.status == 404 and response.headers["X-Request-Id"] == "abc123"
            async with client.get(f"http://127.0.0.1:{port}/v2/health/live") as response:
                made = response.headers["X-Request-Id"]
                assert len(made) == 16
    finally:
        await runner.cleanup()
    access = [r for r in caplog.records if r.name == "appliance.access"]
    assert [getattr(r, "request_id", None) for r in access] == ["abc123", made]
    assert '"GET /v2/models/nope" 404' in access[0].getMessage()


def test_json_lines_carry_the_request_id() -> None:
    record = logging.LogRecord("appliance.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.request_id = "r1"
    _RequestIdFilter().filter(record)
    entry = json.loads(_JsonFormatter().format(record))
    assert entry["msg"] == "hello you" and entry["request_id"] == "r1" and entry["level"] == "info"
