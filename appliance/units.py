"""systemd units for nodes and the coordinator, written for the environment that runs this code.

``appliance install-units`` fills the templates shipped in the package (``appliance/systemd/``,
package data of the wheel) with this interpreter's path, the service user, the state folder and
the node memory limit.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from appliance.errors import ConfigError

TEMPLATES = files("appliance") / "systemd"
UNITS = ("appliance-node@.service", "appliance-coordinator.service")


@dataclass(frozen=True)
class UnitSettings:
    user: str = "appliance"
    state_dir: str = "/var/lib/appliance"
    config_dir: str = "/etc/appliance"
    memory_max: str = "infinity"  # e.g. 12G: the node's memory budget plus headroom
    python: str = sys.executable

    def check(self) -> None:
        """Refuse what systemd would only warn about at boot (and then ignore)."""
        if not _MEMORY_MAX.fullmatch(self.memory_max):
            raise ConfigError(
                f"--memory-max {self.memory_max!r} is not a systemd memory limit; accepted: "
                "bytes with an optional K, M, G, T, P or E suffix (12G), a percentage of RAM "
                "(80%), or infinity"
            )
        if not _USER.fullmatch(self.user):
            raise ConfigError(
                f"--user {self.user!r} is not a valid user name; accepted: letters, digits, "
                "'_' and '-', starting with a letter or '_' (at most 32 characters)"
            )
        for flag, value in (("--state-dir", self.state_dir), ("--config-dir", self.config_dir)):
            if not value.startswith("/") or any(c.isspace() for c in value):
                raise ConfigError(
                    f"{flag} {value!r}: systemd needs an absolute path without spaces"
                )


_MEMORY_MAX = re.compile(r"[0-9]+(\.[0-9]+)?[KMGTPE]?|[0-9]+(\.[0-9]+)?%|infinity")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,31}")


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
