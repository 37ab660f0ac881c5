"""One frozen config object per process: the fields every process shares (``server``), a node's
(``node``) and the coordinator's (``coordinator``), and how TOML and flags become one
(``loading``, which also writes docs/settings.md)."""

from appliance.config.coordinator import CoordinatorConfig
from appliance.config.loading import (
    add_config_flags,
    entries_with_file,
    load_config,
    settings_markdown,
)
from appliance.config.node import NodeConfig
from appliance.config.server import ServerConfig

__all__ = [
    "CoordinatorConfig",
    "NodeConfig",
    "ServerConfig",
    "add_config_flags",
    "entries_with_file",
    "load_config",
    "settings_markdown",
]
