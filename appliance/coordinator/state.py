"""The coordinator's pinned placements on disk: each model's serving version and digest and
where its spans are, so a restarted coordinator serves exactly what it served (not whatever
version is highest on disk now) until an explicit load.

Format 2: ``{"format": 2, "models": {name: {"version", "digest", "placement"}}}``. Format 1
(before versions were pinned: ``{name: placement}``) is read and migrated: its models are
pinned to the version highest on disk at the migration, the one format 1 served.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.coordinator.placement import Placement, SpanAssignment

log = logging.getLogger(__name__)

PLACEMENTS_FILE = "placements.json"
FORMAT = 2


@dataclass(frozen=True)
class Pinned:
    """What one model serves: this version, these bytes, placed so."""

    version: int | None  # None: a format-1 record, pinned at migration
    digest: str | None
    placement: Placement


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


def save_placements(state_dir: Path, pinned: dict[str, Pinned]) -> None:
    """Write atomically: a temp file, fsync, rename, fsync of the folder (a crash leaves the old
    file or the new one, never half of one)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "models": {
            name: {"version": p.version, "digest": p.digest, "placement": p.placement.as_dict()}
            for name, p in pinned.items()
        },
    }
    tmp = state_dir / (PLACEMENTS_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(doc, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, state_dir / PLACEMENTS_FILE)
    folder = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def parse_placements(raw: Any) -> dict[str, Pinned]:
    """Either format; ValueError/KeyError/TypeError on anything else."""
    if not isinstance(raw, dict):
        raise TypeError("placements must be a JSON object")
    if raw.get("format") == FORMAT:
        return {
            name: Pinned(
                int(p["version"]) if p.get("version") is not None else None,
                str(p["digest"]) if p.get("digest") is not None else None,
                placement_from_dict(p["placement"]),
            )
            for name, p in raw["models"].items()
        }
    return {name: Pinned(None, None, placement_from_dict(p)) for name, p in raw.items()}


def restore_placements(state_dir: Path) -> dict[str, Pinned]:
    path = state_dir / PLACEMENTS_FILE
    if not path.is_file():
        return {}
    try:
        pinned = parse_placements(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.error("ignoring unreadable %s: %s", path, exc)
        return {}
    log.info("restored placements of %s", ", ".join(pinned) or "no model")
    return pinned
