"""Where a generated token's CPU goes across spans: ``appliance serve`` with 1 span (S1) and
with 3 spans (S3) on SmolLM2, in alternating rounds, each process sampled by py-spy.

    python -m bench.profile_generate                       # 32 streams, 64 tokens, 2 rounds
    python -m bench.profile_generate --sides S1,S3,S3-1p --streams 16 --rounds 3

For every process (the coordinator and each node) it prints the CPU milliseconds per generated
token (psutil) and how py-spy's samples split between onnxruntime (``Session.run`` on top: the
graph computing, its GIL released), waiting in ``select`` and the rest: the Python of HTTP, the
codec, batching and the event loop. (S3 - S1) / 2 of that rest is the Python price of one more
span per token, which is what a three-span ring pays that one process does not.

Writes a JSON file (bench/results) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from bench.generate_batch import DEFAULT_WORK, Serve, stream_prompts
from bench.generate_common import prompt_text, say
from bench.generate_inproc import ensure_package, package_encoder
from bench.profile import top_frames
from bench.report import save_report

SIDES: dict[str, tuple[int, tuple[str, ...], str]] = {  # key: (nodes, serve flags, node TOML)
    "S1": (1, (), ""),
    "S3": (3, (), ""),
    "S3-1p": (3, ("--in-process-node",), ""),
}
ONNXRUNTIME = ("Session.run", "run_with_ort_values", "run_with_iobinding")


def roles(root: int) -> dict[str, psutil.Process]:
    """The serve process as "coordinator" and its node children by their --node-id."""
    parent = psutil.Process(root)
    out = {"coordinator": parent}
    for index, child in enumerate(parent.children(recursive=True)):
        cmd = child.cmdline()
        name = cmd[cmd.index("--node-id") + 1] if "--node-id" in cmd else f"child-{index}"
        out[name] = child
    return out


def split(raw: Path) -> dict[str, float]:
    """Shares (%) of a py-spy raw file's samples: onnxruntime, select (waiting), the rest."""
    frames = top_frames(raw, 10_000)
    ort = sum(p for p, f in frames if any(k in f for k in ONNXRUNTIME))
    wait = sum(p for p, f in frames if "select (selectors.py" in f)
    return {"onnxruntime": round(ort, 1), "select": round(wait, 1),
            "python": round(max(0.0, 100.0 - ort - wait), 1)}  # fmt: skip


class Sampled:
    """py-spy on every process of one serve while a round runs, and their CPU seconds."""

    def __init__(self, processes: dict[str, psutil.Process], out: Path) -> None:
        self.processes = processes
        self.out = out
        self.cpu: dict[str, float] = {}
        self.raw: dict[str, Path] = {}

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        spy = str(Path(sys.executable).parent / "py-spy")
        samplers = {}
        for name, process in self.processes.items():
            self.raw[name] = self.out / f"{name}.txt"
            command = [spy, "record", "--pid", str(process.pid), "--rate", "100",
                       "--nonblocking", "--format", "raw", "-o", str(self.raw[name])]  # fmt: skip
            samplers[name] = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        before = {n: sum(p.cpu_times()[:2]) for n, p in self.processes.items()}
        try:
            yield
        finally:
            self.cpu = {n: sum(p.cpu_times()[:2]) - before[n] for n, p in self.processes.items()}
            for sampler in samplers.values():
                sampler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            for sampler in samplers.values():
                sampler.wait(timeout=60)


def round_figures(got: dict[str, float], sampled: Sampled) -> dict[str, Any]:
    tokens = max(1, int(got["tokens"]))
    per: dict[str, Any] = {}
    for name, seconds in sampled.cpu.items():
        raw = sampled.raw[name]
        shares = split(raw) if raw.exists() else {}
        row: dict[str, Any] = {"cpu_ms_per_token": round(1000 * seconds / tokens, 3), **shares}
        if shares:
            row["python_ms_per_token"] = round(row["cpu_ms_per_token"] * shares["python"] / 100, 3)
            row["top"] = [(round(p, 1), f) for p, f in top_frames(raw, 6)]
        per[name] = row
    return {**got, "processes": per}


def summarise(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over rounds, per side and process, and the price of an extra span."""
    out: dict[str, Any] = {}
    for side, runs in rounds.items():
        names = runs[0]["processes"].keys()
        procs = {}
        for name in names:
            rows = [r["processes"][name] for r in runs if name in r["processes"]]
            procs[name] = {
                key: round(statistics.median(float(x[key]) for x in rows), 3)
                for key in ("cpu_ms_per_token", "python_ms_per_token", "onnxruntime", "python")
                if all(key in x for x in rows)
            } | {"top": rows[-1].get("top", [])}
        out[side] = {
            "aggregate_tok_s": statistics.median(r["aggregate_tok_s"] for r in runs),
            "processes": procs,
            "cpu_ms_per_token": round(sum(p["cpu_ms_per_token"] for p in procs.values()), 3),
            "python_ms_per_token": round(
                sum(p.get("python_ms_per_token", 0.0) for p in procs.values()), 3
            ),
        }
    if "S1" in out and "S3" in out:
        out["extra_span_python_ms_per_token"] = round(
            (out["S3"]["python_ms_per_token"] - out["S1"]["python_ms_per_token"]) / 2, 3
        )
    return out


def table(summary: dict[str, Any]) -> str:
    lines = ["| side | process | CPU ms/token | onnxruntime % | Python % | Python ms/token |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for side, row in summary.items():
        if not isinstance(row, dict):
            continue
        for name, p in row["processes"].items():
            lines.append(
                f"| {side} ({row['aggregate_tok_s']:.1f} tok/s) | {name} | "
                f"{p['cpu_ms_per_token']:.3f} | {p.get('onnxruntime', '-')} | "
                f"{p.get('python', '-')} | {p.get('python_ms_per_token', '-')} |"
            )
        lines.append(f"| {side} | all | {row['cpu_ms_per_token']:.3f} | | | "
                     f"{row['python_ms_per_token']:.3f} |")  # fmt: skip
    if "extra_span_python_ms_per_token" in summary:
        lines.append(f"\nPython per token of one more span, (S3 - S1) / 2: "
                     f"{summary['extra_span_python_ms_per_token']:.3f} ms")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="S1,S3", help="any of " + ",".join(SIDES))
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not wanted or set(wanted) - set(SIDES):
        parser.error(f"--sides: choose from {','.join(SIDES)}, got {args.sides!r}")
    if not (Path(sys.executable).parent / "py-spy").exists():
        parser.error("py-spy is not installed in this environment: pip install 'py-spy>=0.3'")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    repo = ensure_package(args.work, "fp32", say)
    texts = stream_prompts(args.streams, prompt_text())
    encode = package_encoder(repo)
    ids = [encode(t) for t in texts]
    runner = asyncio.Runner()
    sides: dict[str, Serve] = {}
    rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in wanted}
    started = time.perf_counter()
    try:
        for key in wanted:
            nodes, flags, toml = SIDES[key]
            if toml:
                path = args.work / f"node-{key}.toml"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(toml)
                flags = (*flags, "--node-config", str(path))
            say(f"starting ({key}): appliance serve --nodes {nodes} {' '.join(flags)}")
            sides[key] = Serve(repo, nodes, args.work, runner, extra=flags,
                               variant=f"profile-{key}")  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="profile-generate-") as tmp:
            for r in range(args.rounds):
                order = wanted[r % len(wanted) :] + wanted[: r % len(wanted)]
                for key in order:
                    out = Path(tmp) / f"{key}-{r}"
                    out.mkdir()
                    sampled = Sampled(roles(sides[key].server.process.pid), out)
                    got = sides[key].run(texts, ids, args.new_tokens, sampled())
                    rounds[key].append(round_figures(got, sampled))
                    say(f"round {r + 1}/{args.rounds} ({key}): {got['aggregate_tok_s']} tok/s")
    finally:
        for side in sides.values():
            side.close()
        runner.close()
    summary = summarise(rounds)
    report = {"streams": args.streams, "new_tokens": args.new_tokens, "rounds": args.rounds,
              "cpus": os.cpu_count(), "summary": summary, "per_round": rounds,
              "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    print(table(summary))
    save_report(report, args.out, "profile-generate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
