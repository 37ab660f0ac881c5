"""Config: defaults < TOML < CLI flags, and clear errors for unknown keys and bad values."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from appliance.config import NodeConfig, add_config_flags, load_config
from appliance.errors import ConfigError


def parse(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, NodeConfig, {})
    return vars(parser.parse_args(argv))


def test_cli_flags_override_toml_which_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        'port = 9200\nmax_batch_size = 8\nmodels = ["a", "b"]\nwarmup = false\n'
        "drain_timeout_s = 5\n"
    )
    flags = parse(["--max-batch-size", "16", "--no-warmup", "--device", "cpu"])
    config = load_config(NodeConfig, path, flags)
    assert (config.port, config.max_batch_size, config.models) == (9200, 16, ["a", "b"])
    assert config.warmup is False and config.device == "cpu" and config.drain_timeout_s == 5.0
    assert load_config(NodeConfig, None, {}).max_batch_size == 32


def test_every_field_has_a_flag() -> None:
    import dataclasses

    flags = parse([])
    assert flags == {}  # unset flags stay absent, so they cannot override the TOML file
    parser = argparse.ArgumentParser()
    add_config_flags(parser, NodeConfig, {})
    dests = {action.dest for action in parser._actions}
    assert {f.name for f in dataclasses.fields(NodeConfig)} <= dests


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("prot = 1\n", "unknown key(s) prot; accepted:"),
        ('port = "x"\n', "port must be int"),
        ("warmup = 1\n", "warmup must be bool"),
        ("max_batch_size = true\n", "max_batch_size must be int"),
        ('device = "tpu"\n', "choose one of ['auto', 'cuda', 'cpu']"),
        ("max_batch_size = 0\n", "max_batch_size must be at least 1"),
        ("port = [", "not valid TOML"),
    ],
)
def test_bad_config_files_are_refused_with_the_reason(
    tmp_path: Path, toml: str, fragment: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as error:
        load_config(NodeConfig, path, {})
    assert fragment in str(error.value)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(NodeConfig, tmp_path / "absent.toml", {})


def test_the_settings_reference_matches_the_config_classes() -> None:
    from pathlib import Path

    from appliance.config import settings_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "settings.md"
    assert doc.read_text() == settings_markdown(), "regenerate docs/settings.md (see its header)"
