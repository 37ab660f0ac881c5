"""The ``appliance`` command: ``serve`` (all-in-one) and ``node``; thin over the library."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from appliance.config import NodeConfig, add_config_flags, load_config
from appliance.errors import ConfigError
from appliance.logs import configure_logging
from runtime.errors import RuntimeFailure
from runtime.session import conflicting_onnxruntime_installs

log = logging.getLogger("appliance")

SERVE_PORT = 8000
NODE_PORT = 9100


def default_demo_repo() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "onnx-appliance" / "models"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="all-in-one on this machine: serve the demo model, or what --model-repo holds",
    )
    serve.add_argument("--config", type=Path, help="TOML file with NodeConfig keys")
    add_config_flags(serve, NodeConfig, {"port": SERVE_PORT, "model_repo": "(demo repo)"})
    node = commands.add_parser("node", help="one appliance node serving --model-repo")
    node.add_argument("--config", type=Path, help="TOML file with NodeConfig keys")
    add_config_flags(node, NodeConfig, {"port": NODE_PORT})
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    conflicts = conflicting_onnxruntime_installs()
    if conflicts:
        print(
            "error: several onnxruntime distributions are installed together "
            f"({', '.join(conflicts)}); they overwrite each other's files. Keep exactly one: "
            "pip uninstall -y "
            + " ".join(c.split("==")[0] for c in conflicts)
            + " && pip install onnxruntime (or onnxruntime-gpu)",
            file=sys.stderr,
        )
        return 2
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        if args.command == "serve":
            config = load_config(NodeConfig, args.config, flags, {"port": SERVE_PORT})
            configure_logging(config.log_level, config.log_format)
            config = _with_demo_repo(config)
        else:
            config = load_config(NodeConfig, args.config, flags, {"port": NODE_PORT})
            configure_logging(config.log_level, config.log_format)
            if not config.model_repo:
                raise ConfigError(
                    "appliance node needs --model-repo DIR (or model_repo in --config)"
                )
        return asyncio.run(_run_node(config))
    except (ConfigError, RuntimeFailure) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _with_demo_repo(config: NodeConfig) -> NodeConfig:
    """``serve`` with no repository, or an empty one, serves the built-in demo model."""
    from dataclasses import replace

    from exporter.demo_model import ensure_demo_package
    from runtime.package import list_repository

    repo = Path(config.model_repo) if config.model_repo else default_demo_repo()
    if not list_repository(repo):
        log.info("no model in %s: building the demo model there (once)", repo)
        ensure_demo_package(repo)
    return replace(config, model_repo=str(repo))


async def _run_node(config: NodeConfig) -> int:
    from appliance.node_server import build_node_app, start_app

    app = build_node_app(config)
    runner, port = await start_app(app, config.host, config.port)
    host = f"[{config.host}]" if ":" in config.host else config.host
    log.info("listening on http://%s:%d (model repository %s)", host, port, config.model_repo)
    print(f"appliance listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing in-flight requests")
    await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
