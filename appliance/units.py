"""systemd units for nodes and the coordinator, written for the environment that runs this code.

``appliance install-units`` fills the templates shipped in the package (``appliance/systemd/``,
package data of the wheel) with this interpreter's path, the service user, the state folder and
the node memory limit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

TEMPLATES = files("appliance") / "systemd"
UNITS = ("appliance-node@.service", "appliance-coordinator.service")


@dataclass(frozen=True)
class UnitSettings:
    user: str = "appliance"
    state_dir: str = "/var/lib/appliance"
    config_dir: str = "/etc/appliance"
    memory_max: str = "infinity"  # e.g. 12G: the node's memory budget plus headroom
    python: str = sys.executable


def render(template: str, settings: UnitSettings) -> str:
    return (
        template.replace("@PYTHON@", settings.python)
        .replace("@USER@", settings.user)
        .replace("@STATE_DIR@", settings.state_dir)
        .replace("@CONFIG_DIR@", settings.config_dir)
        .replace("@MEMORY_MAX@", settings.memory_max)
    )


def install_units(prefix: Path, settings: UnitSettings) -> list[Path]:
    prefix.mkdir(parents=True, exist_ok=True)
    written = []
    for name in UNITS:
        target = prefix / name
        target.write_text(render((TEMPLATES / name).read_text(), settings))
        written.append(target)
    return written
