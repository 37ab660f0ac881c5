"""The node settings of the hot path: intra_op_threads (-1 = auto by default) and runs_in_flight,
as checked and as handed to the runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import NodeConfig, load_config
from appliance.errors import ConfigError
from runtime.session import AUTO_THREADS


def test_node_settings_default_to_auto_threads_and_carry_runs_in_flight() -> None:
    config = NodeConfig(runs_in_flight=2)
    config.check()
    assert config.session_settings().intra_op_threads == AUTO_THREADS
    assert config.batch_settings().runs_in_flight == 2
    assert config.session_settings().concurrent_runs == 2  # auto threads are shared by both
    assert NodeConfig().batch_settings().runs_in_flight == NodeConfig.runs_in_flight


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"intra_op_threads": -2}, "intra_op_threads must be -1 \\(auto\\)"),
        ({"runs_in_flight": 0}, "runs_in_flight must be at least 1"),
        ({"decode_cohorts": 0}, "decode_cohorts must be at least 1"),
        ({"alone_intra_op_threads": -1}, "alone_intra_op_threads must be 0 or more"),
    ],
)
def test_node_settings_out_of_range_are_refused(changes: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NodeConfig(**changes).check()  # type: ignore[arg-type]


def test_decode_io_binding_reaches_the_sessions_and_a_bad_value_is_refused(tmp_path: Path) -> None:
    assert NodeConfig().session_settings().decode_io_binding == "auto"
    path = tmp_path / "node.toml"
    path.write_text('decode_io_binding = "on"\n')
    config = load_config(NodeConfig, path, {})
    assert config.session_settings().decode_io_binding == "on"
    path.write_text('decode_io_binding = "sometimes"\n')
    with pytest.raises(ConfigError, match="decode_io_binding.*'auto', 'on', 'off'"):
        load_config(NodeConfig, path, {}).check()


def test_alone_threads_reach_the_sessions(tmp_path: Path) -> None:
    assert NodeConfig().session_settings().alone_intra_op_threads == 0  # none unless asked
    path = tmp_path / "node.toml"
    path.write_text("alone_intra_op_threads = 2\n")
    assert load_config(NodeConfig, path, {}).session_settings().alone_intra_op_threads == 2
