"""Profile the hot path, then measure each fix against the design before it, in the same run.

    python -m bench.profile                  # MiniLM (16 tokens) if installed, else the demo
    python -m bench.profile --model demo --rounds 3 --seconds 6

1. Coordinator + one node at concurrency 32 (binary bodies, cache bypassed, wrk where
   installed): py-spy samples both processes and the busiest frames are printed, with each
   process's CPU time per request (psutil), which is what competes with onnxruntime on a
   small machine.
2. A/B: every variant (a fix and the design before it, as coordinator flags) runs as its own
   coordinator + node, all started once; measurement rounds alternate between them, so noise
   on a shared machine hits both alike. Medians of the rounds, and the ratio to the baseline.

Writes a JSON file (bench/results) and ``docs/profile.md``.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.loadgen import run_load, run_wrk
from bench.report import save_report, write_keeping_others
from bench.suite import DOCS, Model, _v2_body, prepare_models
from tests.support.harness import Ring

TOKEN = "bench-profile-" + "t" * 24
# (label, coordinator flags, internal calls signed, bearer token required): the first is the
# baseline (the design before the fix); the last prices auth and signing on the hot path
VARIANTS: list[tuple[str, list[str], bool, bool]] = [
    (
        "one hop per request, aiohttp client (before)",
        ["--no-hop-batching", "--no-lean-hops"],
        False,
        False,
    ),
    ("one hop per request, lean hop client", ["--no-hop-batching"], False, False),
    ("hop batching + lean hop client (after)", [], False, False),
    ("after, with auth + signed hops", [], True, True),
]


@dataclass
class Variant:
    label: str
    flags: list[str]
    ring: Ring
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)


def start_variant(
    work: Path, model: Model, variant: tuple[str, list[str], bool, bool], threads: int
) -> Variant:
    label, flags, signed, auth = variant
    ring = Ring(work / re.sub(r"\W+", "-", label), model.repo, signed=signed)
    ring.token = TOKEN if auth else ""
    tokens = ["--tokens", f"admin:{TOKEN}"] if auth else []
    try:
        ring.start_coordinator("--log-level", "warning", *flags, *tokens)
        ring.start_node("n0", "--log-level", "warning", threads=threads)
        ring.wait_members(1)
        ring.load(model.name, 1, 1)
        ring.wait_ready()
    except BaseException:
        ring.stop()  # nothing left running behind a failed start
        raise
    headers = {"Authorization": f"Bearer {TOKEN}"} if auth else {}
    url = f"{ring.url}/v2/models/{model.name}/infer"
    shown = flags + (["--tokens admin:…"] if auth else [])
    shown += ["--cluster-secrets-file …"] if signed else []
    return Variant(label, shown, ring, url, headers)


def measure(url: str, body: bytes, headers: dict[str, str], seconds: float) -> dict[str, Any]:
    if shutil.which("wrk"):
        return run_wrk(url, body, headers, 32, seconds).as_dict()
    import asyncio

    return asyncio.run(run_load(url, body, headers, 32, seconds)).as_dict()


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    return {name: sum(psutil.Process(pid).cpu_times()[:2]) for name, pid in pids.items()}


def top_frames(raw: Path, count: int) -> list[tuple[float, str]]:
    """The frames most often on top of the stack in a py-spy raw (collapsed) file."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        frame = re.sub(r" \((?:.*/)?([^/]+)\)$", r" (\1)", stack.split(";")[-1])
        own[frame] += int(samples)
        total += int(samples)
    return [(100.0 * n / max(total, 1), frame) for frame, n in own.most_common(count)]


def profile(
    variant: Variant, body: bytes, headers: dict[str, str], seconds: float, out: Path
) -> dict[str, Any]:
    ring = variant.ring
    assert ring.coordinator is not None
    pids = {"coordinator": ring.coordinator.pid, "node": ring.nodes["n0"].pid}
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    samplers = []
    if Path(spy).exists():
        for name, pid in pids.items():
            samplers.append(
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(int(seconds)),
                        "--rate",
                        "200",
                        "--nonblocking",
                        "--format",
                        "raw",
                        "-o",
                        str(out / f"{name}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    before = cpu_seconds(pids)
    row = measure(variant.url, body, headers, seconds)
    after = cpu_seconds(pids)
    for sampler in samplers:
        sampler.wait(timeout=seconds + 30)
    served = row["requests"] * (1 + 1 / max(1, round(seconds)))  # wrk's 1 s warm-up counts too
    result: dict[str, Any] = {
        "variant": variant.label,
        "throughput_rps": row["throughput_rps"],
        "cpu_us_per_request": {
            name: round((after[name] - before[name]) / max(served, 1) * 1e6) for name in pids
        },
        "top_frames": {},
    }
    for name in pids:
        raw = out / f"{name}.txt"
        if raw.exists():
            result["top_frames"][name] = top_frames(raw, 12)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["auto", "demo", "minilm"], default="auto")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--docs", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        work = Path(tmp)
        models = prepare_models(work, quick=args.model == "demo")
        wanted = "minilm" if args.model in ("auto", "minilm") else "demo"
        model = next((m for m in models if m.name == wanted), models[0])
        body, headers = _v2_body(model, args.tokens, binary=True)
        variants: list[Variant] = []
        try:
            for variant in VARIANTS:
                variants.append(start_variant(work, model, variant, args.threads))
            for v in variants:  # warm every path before anything is counted
                measure(v.url, body, {**headers, **v.headers}, 2)
            profiles: list[dict[str, Any]] = []
            for v in variants:
                out = work / f"spy-{len(profiles)}"
                out.mkdir()
                profiles.append(profile(v, body, {**headers, **v.headers}, args.seconds, out))
            for index in range(args.rounds):
                order = variants if index % 2 == 0 else variants[::-1]
                for v in order:
                    v.rounds.append(measure(v.url, body, {**headers, **v.headers}, args.seconds))
                    print(
                        f"round {index + 1} {v.label}: {v.rounds[-1]['throughput_rps']:.1f} req/s",
                        flush=True,
                    )
        finally:
            for v in variants:
                v.ring.stop()
    report = summarise(model.name, args, profiles, variants)
    save_report(report, args.out, "profile")
    path = write_markdown(report, args.docs)
    print(f"wrote {path}")
    return 0


def summarise(
    model: str, args: argparse.Namespace, profiles: list[dict[str, Any]], variants: list[Variant]
) -> dict[str, Any]:
    rows = []
    base = statistics.median(r["throughput_rps"] for r in variants[0].rounds)
    for v in variants:
        rps = statistics.median(r["throughput_rps"] for r in v.rounds)
        rows.append(
            {
                "variant": v.label,
                "flags": v.flags,
                "throughput_rps": round(rps, 1),
                "p50_ms": round(statistics.median(r["p50_ms"] for r in v.rounds), 2),
                "p99_ms": round(statistics.median(r["p99_ms"] for r in v.rounds), 2),
                "ratio_to_before": round(rps / base, 3),
                "rounds_rps": [r["throughput_rps"] for r in v.rounds],
            }
        )
    return {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "model": model,
        "tokens": args.tokens,
        "threads": args.threads,
        "cpus": psutil.cpu_count(),
        "concurrency": 32,
        "seconds": args.seconds,
        "profiles": profiles,
        "ab": rows,
    }


def write_markdown(report: dict[str, Any], docs: Path) -> Path:
    lines = [
        "# Profile of the hot path",
        "",
        f"Produced by `python -m bench.profile` on {report['when']} ({report['cpus']} cores): "
        f"coordinator + one node, {report['model']} with {report['tokens']} tokens, "
        f"{report['threads']} onnxruntime threads, concurrency {report['concurrency']}, binary "
        "bodies, cache bypassed, loopback.",
        "",
        "## Where the time goes",
        "",
    ]
    for p in report["profiles"]:
        cpu = p["cpu_us_per_request"]
        lines += [
            f"### {p['variant']}: {p['throughput_rps']:.1f} req/s while sampled; CPU per "
            f"request: coordinator {cpu['coordinator']} us, node {cpu['node']} us",
            "",
        ]
        for name, frames in p["top_frames"].items():
            lines += [f"{name} (share of its samples, on top of the stack):", ""]
            lines += [f"- {share:.1f}% `{frame}`" for share, frame in frames[:8]]
            lines.append("")
    lines += [
        "## Each fix against the design before it (same run, alternating rounds)",
        "",
        "| variant | coordinator flags | req/s (median) | p50 ms | p99 ms | ratio | rounds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["ab"]:
        rounds = ", ".join(f"{x:.0f}" for x in r["rounds_rps"])
        lines.append(
            f"| {r['variant']} | `{' '.join(r['flags'])}` | {r['throughput_rps']:.1f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['ratio_to_before']:.2f}x | {rounds} |"
        )
    docs.mkdir(parents=True, exist_ok=True)
    path = docs / "profile.md"
    # sections other benches wrote (levers, generation) are kept
    return write_keeping_others(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
