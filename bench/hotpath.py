"""The hot path on the MLP of bench/mlp.py: served rows/s and added latency, side by side.

    python -m bench.hotpath                  # 3 rounds, Ray Serve (both ingresses) included
    python -m bench.hotpath --quick          # 1 short round, no Ray: a smoke run
    python -m bench.hotpath --rounds 2 --seconds 4 --no-ray

One row per request, binary protocol, cache bypassed (``Cache-Control: no-cache, no-store``),
concurrency 32 (throughput) and 1 (latency), load from bench/loadgen.py's closed loop in this
process. Every round measures every system, in an order rotated per round; the table shows
medians over rounds and the median of the per-round ratios to the in-process baseline
(``session.run`` on batches of 32, today's threads). Next to every figure: the cores the load
generator (this process) and the server (its process tree) kept busy, read with psutil.

The lever, onnxruntime threading under contention (settings only, today's design): in
process, today's intra-op threads versus intra-op = cores - 1 versus 1 thread x 2 runs in
flight on one session, each also with the load generator's CPU taken by another process
(``--steal-cores``; by default what the generator spent against the node at c=32 in a
calibration point): the onnxruntime ceiling a server on the same cores can reach; served,
a node with intra-op 1, and ``appliance serve --nodes 2`` (two nodes of 1 thread each: 2 runs
in flight, 2 sessions).

The node levers, each a node process of its own measured in the same rounds: today's design
(``intra_op_threads = 0``, onnxruntime's default, one run in flight), lever 1 (the default
``intra_op_threads = -1``: the usable cores, cores - 1 before 2026-12-04) and lever 1 with
``runs_in_flight = N`` for each N of ``--runs-in-flight`` (the next batch forms and starts
while one runs). Every node point also reports the rows per run the node's batcher formed (its
statistics, read before and after). ``--focus serve`` measures in process, a node and
``appliance serve`` with and without ``--in-process-node`` (the coordinator and its node in one
process: no loopback hop). ``--focus nodes`` measures only those and the in-process runs, so
that a round is short and its systems see the same load on a shared machine.
The servers stay up for the whole run; their idle CPU while others are measured is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import hotpath_systems as systems
from bench.hotpath_report import print_tables, summarise
from bench.mlp import WIDTH, write_mlp_repo
from bench.report import save_report
from bench.serving import sample_inputs
from runtime.codec import encode_request
from runtime.package import SpanRunner
from runtime.session import SessionSettings, intra_op_threads_for

MODEL = "mlp"
BATCH = 32
BASELINE = "in-process onnxruntime, batches of 32"
NODE_TODAY = "a standalone node"
SERVE_TODAY = "`appliance serve` (coordinator + 1 node)"
SERVE_ONE_PROCESS = "lever: `appliance serve --in-process-node` (coordinator + 1 node, one process)"
Measure = Callable[[], dict[int, dict[str, Any]]]


def _body(signature: Any) -> tuple[bytes, dict[str, str], dict[str, np.ndarray]]:
    feeds = sample_inputs(signature, 1, 1)
    body, length = encode_request(feeds, binary_inputs=True, binary_outputs=True)
    headers = {
        "Content-Type": "application/octet-stream",
        "Cache-Control": "no-cache, no-store",
    }
    if length is not None:
        headers["Inference-Header-Content-Length"] = str(length)
    return body, headers, feeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round, short points, no Ray")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per point, c=32")
    parser.add_argument("--seconds-c1", type=float, default=3.0, help="seconds per point, c=1")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="today's")
    parser.add_argument(
        "--steal-cores",
        type=float,
        default=0.0,
        help="CPU (cores) taken by another process in the contention points; 0 = what the "
        "load generator spent against the node at c=32 in a calibration point",
    )
    parser.add_argument("--width", type=int, default=WIDTH, help="MLP width (tests: smaller)")
    parser.add_argument("--ray", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--no-levers", action="store_true", help="today's systems only")
    parser.add_argument(
        "--focus",
        choices=["all", "nodes", "serve"],
        default="all",
        help="nodes: only the in-process runs and the node levers (short rounds); serve: only "
        "in process, a node and appliance serve with and without --in-process-node",
    )
    parser.add_argument(
        "--runs-in-flight",
        type=int,
        nargs="*",
        default=[2],
        help="node lever: runs_in_flight values measured with intra-op auto (none: skip)",
    )
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.seconds_c1 = 1, min(args.seconds, 2.0), 1.0
    use_ray = (not args.quick) if args.ray is None else args.ray
    with tempfile.TemporaryDirectory(prefix="hotpath-") as tmp:
        report = run(Path(tmp), args, use_ray)
    print_tables(report)
    save_report(report, args.out, "hotpath")
    return 0


def run(work: Path, args: argparse.Namespace, use_ray: bool) -> dict[str, Any]:
    repo = work / "repo"
    started = time.perf_counter()
    onnx_path = write_mlp_repo(repo, MODEL, width=args.width)
    print(f"built {onnx_path.stat().st_size / 1e6:.0f} MB MLP", flush=True)
    cores = args.threads
    today = systems.load_runner(repo, MODEL, cores)
    single = systems.load_runner(repo, MODEL, 1)
    lean = single if cores - 1 <= 1 else systems.load_runner(repo, MODEL, cores - 1)
    body, headers, one_row = _body(today.signature)
    setup = Setup(
        onnx_path,
        body,
        headers,
        one_row,
        {k: np.repeat(v, BATCH, axis=0) for k, v in one_row.items()},
        {"today": today, "lean": lean, "single": single},
    )

    servers: dict[str, Any] = {}
    calibration: dict[str, Any] | None = None
    load_start = os.getloadavg()
    try:
        print("starting the node(s) and appliance serve ...", flush=True)
        servers["node"] = systems.start_node(repo, MODEL, 0, BATCH)  # today: onnxruntime's
        full = args.focus == "all"
        if args.focus in ("all", "serve") and not args.no_levers:
            servers["serve one process"] = systems.ServeProcess(
                repo, MODEL, 1, work / "serve-1p", ("--in-process-node",)
            )
        if args.focus in ("all", "serve"):
            servers["serve"] = systems.ServeProcess(repo, MODEL, 1, work / "serve-1")
        if not args.no_levers and args.focus != "serve":
            servers["node auto"] = systems.start_node(repo, MODEL, -1, BATCH)
            for n in args.runs_in_flight:
                servers[f"node auto x{n}"] = systems.start_node(repo, MODEL, -1, BATCH, n)
        if not args.no_levers and full:
            servers["serve 2 nodes"] = systems.ServeProcess(repo, MODEL, 2, work / "serve-2")
        urls = {name: f"{s.url}/v2/models/{MODEL}/infer" for name, s in servers.items()}
        for url in urls.values():
            asyncio.run(systems.wait_answers(url, body, headers, 300))
        print(f"servers up after {time.perf_counter() - started:.0f}s", flush=True)
        if not args.steal_cores and not args.no_levers and full:  # the generator's CPU
            pid = servers["node"].process.pid
            calibration = asyncio.run(
                systems.served(urls["node"], body, headers, 32, min(3.0, args.seconds), pid)
            )
            args.steal_cores = round(max(0.05, calibration["generator_cores"]), 2)
            print(f"contention: {args.steal_cores} cores stolen (the generator's)", flush=True)
        measures = _measures(args, use_ray, servers, urls, setup)
        probe = None if args.no_levers else _probe(args, urls, setup)
        rounds, probes = _rounds(measures, args.rounds, servers, probe)
    finally:
        for server in servers.values():
            server.stop()
    pairs = lever_pairs(args)
    return {
        "bench": "hotpath",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": "python -m bench.hotpath " + " ".join(sys.argv[1:]),
        "model": {"name": MODEL, "width": args.width, "bytes": onnx_path.stat().st_size},
        "cpus": os.cpu_count(),
        "threads_today": cores,
        "focus": args.focus,
        "steal_cores": args.steal_cores,
        "steal_calibration": calibration,
        "rounds": args.rounds,
        "seconds": {"c32": args.seconds, "c1": args.seconds_c1},
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "wall_s": round(time.perf_counter() - started, 1),
        "node_levers": node_lever_names(args) if not args.no_levers else [],
        "raw": rounds,
        "raw_interleaved_c1": probes,
        "summary": summarise(rounds, pairs, probes),
    }


def _auto_threads() -> int:
    return intra_op_threads_for(SessionSettings(device="cpu"), cuda=False)


def node_lever_names(args: argparse.Namespace) -> list[str]:
    """Today's node, lever 1, lever 1 + each runs_in_flight: the rows the brief compares."""
    auto = _auto_threads()
    names = [NODE_TODAY, f"lever: standalone node, intra-op auto ({auto})"]
    names += [
        f"lever: standalone node, intra-op auto ({auto}), {n} runs in flight"
        for n in args.runs_in_flight
    ]
    return names


def lever_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(today, variant) pairs whose per-round ratios the summary takes."""
    cores, steal = args.threads, args.steal_cores
    lean = max(1, cores - 1)
    pairs = [
        (BASELINE, f"lever: in-process, intra-op {lean} (cores - 1)"),
        (BASELINE, "lever: in-process, 1 thread x 2 runs in flight"),
        (
            f"lever: in-process, today, {steal} cores stolen",
            f"lever: in-process, intra-op {lean}, {steal} cores stolen",
        ),
        (
            f"lever: in-process, today, {steal} cores stolen",
            f"lever: in-process, 1 thread x 2 in flight, {steal} cores stolen",
        ),
    ]
    nodes = node_lever_names(args)
    pairs += [(NODE_TODAY, name) for name in nodes[1:]]
    pairs += [(nodes[1], name) for name in nodes[2:]]  # runs in flight over lever 1 alone
    pairs.append((SERVE_TODAY, "lever: `appliance serve --nodes 2` (1 thread x 2 nodes)"))
    pairs.append((SERVE_TODAY, SERVE_ONE_PROCESS))
    return pairs  # the summary keeps those whose both systems were measured


@dataclass
class Setup:
    onnx_path: Path
    body: bytes  # one row, v2 binary
    headers: dict[str, str]
    one_row: dict[str, np.ndarray]
    batch: dict[str, np.ndarray]  # BATCH rows
    runners: dict[str, SpanRunner]  # today, lean (cores - 1), single (1 thread)


def _measures(
    args: argparse.Namespace,
    use_ray: bool,
    servers: dict[str, Any],
    urls: dict[str, str],
    setup: Setup,
) -> dict[str, Measure]:
    """Each system's points as a call: concurrency -> row (in process: 32 = a batch of 32)."""
    seconds, c1 = args.seconds, args.seconds_c1
    cores, steal = args.threads, args.steal_cores
    body, headers, batch, one_row = setup.body, setup.headers, setup.batch, setup.one_row
    today, lean, single = (setup.runners[k] for k in ("today", "lean", "single"))
    onnx_path = setup.onnx_path

    def inproc(runner: Any, in_flight: int = 1, stolen: float = 0.0, latency: bool = False):
        def measure() -> dict[int, dict[str, Any]]:
            points = {32: systems.in_process(runner, batch, seconds, in_flight, stolen)}
            if latency:
                points[1] = systems.in_process(runner, one_row, c1)
            return points

        return measure

    def served(name: str, latency: bool = True) -> Measure:
        stats = f"{servers[name].url}/v2/models/{MODEL}/stats" if name.startswith("node") else ""

        def point(concurrency: int, length: float) -> dict[str, Any]:
            pid = servers[name].process.pid
            before = asyncio.run(systems.run_counts(stats)) if stats else None
            row = asyncio.run(systems.served(urls[name], body, headers, concurrency, length, pid))
            if before is not None:  # rows per run the node's batcher formed (warm-up included)
                after = asyncio.run(systems.run_counts(stats))
                rows, runs = after[0] - before[0], after[1] - before[1]
                row["node_runs"] = runs
                row["rows_per_run"] = round(rows / runs, 2) if runs else None
            return row

        def measure() -> dict[int, dict[str, Any]]:
            points = {32: point(32, seconds)}
            if latency:
                points[1] = point(1, c1)
            return points

        return measure

    def ray(haproxy: bool) -> Measure:
        def measure() -> dict[int, dict[str, Any]]:
            from bench.ray_serve import run_ray_bench

            result = run_ray_bench(
                onnx_path, {"x": one_row["x"]}, [32, 1], seconds, cores, haproxy=haproxy
            )
            points = {}
            for row in result["rows"]:
                row["rows_per_s"] = row["throughput_rps"]
                row["ray_settings"] = result["settings"]
                points[int(row["concurrency"])] = row
            return points

        return measure

    measures: dict[str, Measure] = {
        BASELINE: inproc(today, latency=True),
        NODE_TODAY: served("node"),
    }
    if args.focus in ("all", "serve"):
        measures[SERVE_TODAY] = served("serve")
    if args.focus in ("all", "serve") and not args.no_levers:
        measures[SERVE_ONE_PROCESS] = served("serve one process")
    if use_ray:
        measures["Ray Serve + @serve.batch(32), default proxy"] = ray(False)
        measures["Ray Serve + @serve.batch(32), HAProxy ingress"] = ray(True)
    if not args.no_levers and args.focus != "serve":
        measures |= {
            f"lever: in-process, intra-op {max(1, cores - 1)} (cores - 1)": inproc(lean),
            "lever: in-process, 1 thread x 2 runs in flight": inproc(single, 2),
        }
    if not args.no_levers and args.focus == "all":
        measures |= {
            f"lever: in-process, today, {steal} cores stolen": inproc(today, 1, steal),
            f"lever: in-process, intra-op {max(1, cores - 1)}, {steal} cores stolen": inproc(
                lean, 1, steal
            ),
            f"lever: in-process, 1 thread x 2 in flight, {steal} cores stolen": inproc(
                single, 2, steal
            ),
            "lever: `appliance serve --nodes 2` (1 thread x 2 nodes)": served("serve 2 nodes"),
        }
    if not args.no_levers and args.focus != "serve":
        nodes = node_lever_names(args)
        measures[nodes[1]] = served("node auto")
        for n, name in zip(args.runs_in_flight, nodes[2:], strict=True):
            measures[name] = served(f"node auto x{n}")
    return measures


def _probe(
    args: argparse.Namespace, urls: dict[str, str], setup: Setup
) -> Callable[[], dict[str, dict[str, Any]]]:
    """The node levers and the in-process 1-row runs at c=1, interleaved request by request."""
    if args.focus == "serve":  # a hop less: the node, serve, serve in one process
        keys = ["node", "serve", "serve one process"]
        nodes = [NODE_TODAY, SERVE_TODAY, SERVE_ONE_PROCESS]
    else:
        nodes = node_lever_names(args)
        keys = ["node", "node auto", *(f"node auto x{n}" for n in args.runs_in_flight)]
    targets = {name: urls[key] for name, key in zip(nodes, keys, strict=True)}
    today, single = setup.runners["today"], setup.runners["single"]
    runs = {
        BASELINE: lambda: today.run(setup.one_row),
        "in-process, intra-op 1, 1-row run": lambda: single.run(setup.one_row),
    }
    seconds = max(1.0, args.seconds_c1 * len(targets) / 2)

    def probe() -> dict[str, dict[str, Any]]:
        return asyncio.run(
            systems.interleaved_c1(targets, runs, setup.body, setup.headers, seconds)
        )

    return probe


def _rounds(
    measures: dict[str, Measure],
    rounds: int,
    servers: dict[str, Any],
    probe: Callable[[], dict[str, dict[str, Any]]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, dict[str, Any]]]]:
    names = list(measures)
    out, probes = [], []
    for index in range(rounds):
        shift = index % len(names)
        order = names[shift:] + names[:shift]  # rotated: no system always runs first or last
        results: dict[str, Any] = {}
        for position, name in enumerate(order, 1):
            print(f"round {index + 1}/{rounds}, {position}/{len(order)}: {name}", flush=True)
            idle = systems.CpuMeter([s.process.pid for s in servers.values()])
            points = measures[name]()
            if name.startswith(("in-process", "lever: in-process")) or name.startswith("Ray"):
                for point in points.values():  # the servers up but not measured, meanwhile
                    point["idle_servers_cores"] = round(idle.cores(), 3)
            results[name] = {str(c): row for c, row in points.items()}
            rates = ", ".join(f"c={c} {r['rows_per_s']:.0f} rows/s" for c, r in points.items())
            print(f"  {rates}", flush=True)
        out.append(results)
        if probe is not None:
            print(f"round {index + 1}/{rounds}: c=1 interleaved, node levers", flush=True)
            probes.append(probe())
            line = ", ".join(
                f"{n.removeprefix('lever: ')} {r['p50_ms']} ms" for n, r in probes[-1].items()
            )
            print(f"  p50: {line}", flush=True)
    return out, probes


if __name__ == "__main__":
    sys.exit(main())
