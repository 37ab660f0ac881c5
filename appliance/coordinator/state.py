"""The coordinator's pinned placements on disk: they survive a restart, so a restarted
coordinator routes to the same spans instead of placing everything again."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from appliance.coordinator.placement import Placement, SpanAssignment

log = logging.getLogger(__name__)

PLACEMENTS_FILE = "placements.json"


def placement_from_dict(raw: dict[str, Any]) -> Placement:
    """The inverse of ``Placement.as_dict``."""
    spans = tuple(
        SpanAssignment(
            int(s["span"]),
            int(s["first"]),
            int(s["last"]),
            int(s["bytes"]),
            tuple(str(r) for r in s["replicas"]),
        )
        for s in raw["spans"]
    )
    return Placement(int(raw["version"]), spans)


def save_placements(state_dir: Path, placements: dict[str, Placement]) -> None:
    """Write atomically: a temp file, fsync, rename, fsync of the folder (a crash leaves the old
    file or the new one, never half of one)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (PLACEMENTS_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({n: p.as_dict() for n, p in placements.items()}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, state_dir / PLACEMENTS_FILE)
    folder = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def restore_placements(state_dir: Path) -> dict[str, Placement]:
    path = state_dir / PLACEMENTS_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        placements = {name: placement_from_dict(p) for name, p in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.error("ignoring unreadable %s: %s", path, exc)
        return {}
    log.info("restored placements of %s", ", ".join(placements) or "no model")
    return placements
