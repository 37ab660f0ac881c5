"""docs/openapi.yaml documents every public route the coordinator really serves."""

from __future__ import annotations

from pathlib import Path

import yaml

from appliance.config import CoordinatorConfig
from appliance.coordinator.app import build_coordinator_app
from appliance.http.openapi import openapi_yaml


def test_the_document_is_generated_and_covers_every_public_route(tmp_path: Path) -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
    assert doc.read_text() == openapi_yaml(), (
        "regenerate: .venv/bin/python -m appliance.http.openapi > docs/openapi.yaml"
    )
    paths = yaml.safe_load(doc.read_text())["paths"]
    app = build_coordinator_app(CoordinatorConfig(model_repo=str(tmp_path)))
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and not route.resource.canonical.startswith("/internal/")
    }
    documented = {(method, path) for path, ops in paths.items() for method in ops}
    assert served == documented
