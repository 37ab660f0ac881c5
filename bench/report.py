"""Where benchmark figures go: a JSON file under bench/results (or --out), then its path."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def save_report(report: dict[str, Any], out: Path | None, stem: str) -> Path:
    path = out or RESULTS / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def write_keeping_others(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, followed by the sections other benches wrote there."""
    if path.exists():
        text += "".join(other_sections(path.read_text(), text))
    path.write_text(text)
    return path


def other_sections(old: str, new: str) -> list[str]:
    """The ``## `` sections of ``old`` whose titles ``new`` does not have, in order. A title is
    compared without what follows its first " (": the suite's carry their figures there
    ("## demo, 16 tokens (in-process limit 527.2 rows/s)"), and a new run replaces them."""
    titles = {_title_key(line) for line in new.splitlines() if line.startswith("## ")}
    kept = []
    for part in old.split("\n## ")[1:]:
        if _title_key("## " + part.splitlines()[0]) not in titles:
            kept.append("\n## " + part.rstrip("\n") + "\n")
    return kept


def _title_key(title: str) -> str:
    return title.split(" (", 1)[0].rstrip()
