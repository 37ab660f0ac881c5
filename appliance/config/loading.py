"""From TOML and flags to a config object, and the settings reference made from the classes."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from appliance.config.coordinator import CoordinatorConfig
from appliance.config.node import NodeConfig
from appliance.errors import ConfigError


def entries_with_file(entries: list[str], path: str, key: str) -> list[str]:
    """Values given in the config plus those of a file (one per line, # comments), as tokens
    and cluster secrets are: a file can be readable by the service user alone."""
    lines = list(entries)
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {key} {path}: {exc}") from exc
        lines += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return lines


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type[Any], defaults: dict[str, Any]
) -> None:
    """One flag per config field; unset flags stay absent so TOML values are not overridden."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        help_text = f.metadata.get("help", "")
        default = defaults.get(f.name, _default_of(f))
        help_text = f"{help_text} (default: {default!r})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if hint is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif get_origin(hint) is list:
            parser.add_argument(_flag(f.name), nargs="*", metavar="NAME", **kwargs)
        elif get_origin(hint) is Literal:
            parser.add_argument(_flag(f.name), choices=list(get_args(hint)), **kwargs)
        else:
            parser.add_argument(_flag(f.name), type=hint, **kwargs)


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _coerce(cls: type[Any], key: str, value: Any, where: str) -> Any:
    hint = typing.get_type_hints(cls)[key]
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(
                f"{where}: {key} = {value!r} is not accepted; choose one of {list(get_args(hint))}"
            )
        return value
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of strings, got {value!r}")
        return list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type):
        # bool is an int subclass: refuse true/false where a number is expected
        wrong = not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))
        if wrong:
            raise ConfigError(
                f"{where}: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}"
            )
    return value


def load_config(
    cls: type[Any],
    path: Path | None,
    overrides: dict[str, Any],
    defaults: dict[str, Any] | None = None,
) -> Any:
    """defaults < TOML file < CLI flags; unknown keys and wrong types are ConfigErrors."""
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = dict(defaults or {})
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(
                f"{path}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}"
            )
        values.update({k: _coerce(cls, k, v, str(path)) for k, v in raw.items()})
    values.update(
        {k: _coerce(cls, k, v, "command line") for k, v in overrides.items() if k in known}
    )
    config = cls(**values)
    config.check()
    return config


def settings_markdown() -> str:
    """docs/settings.md, generated from the config classes (a test keeps the file in step)."""
    lines = [
        "# Settings",
        "",
        "Every setting is a key of the process's TOML file (`--config FILE`) and a flag of the",
        "same name (`max_batch_size` = `--max-batch-size`); flags override the file, which",
        'overrides the defaults. Regenerate: `python -c "from appliance.config import '
        "settings_markdown; print(settings_markdown(), end='')\" > docs/settings.md`.",
        "",
    ]
    for title, cls in (
        ("Node (`appliance node`)", NodeConfig),
        ("Coordinator (`appliance coordinator`, `appliance serve`)", CoordinatorConfig),
    ):
        lines += [
            f"## {title}",
            "",
            "| key | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            kind = kind.replace("|", "\\|")
            lines.append(
                f"| `{f.name}` | {kind} | `{_default_of(f)!r}` | {f.metadata.get('help', '')} |"
            )
        lines.append("")
    return "\n".join(lines)
