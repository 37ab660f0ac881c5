"""Text generation, one stream, SmolLM2-135M: the appliance next to the limit, PyTorch and
llama.cpp, in one run.

    python -m bench.generate                      # all sides, prompts of 32 and 512 tokens
    python -m bench.generate --quick              # smoke run: 32-token prompt, 32 new tokens
    python -m bench.generate --sides a,b,d --rounds 9 --work /data/generate-bench

Every side decodes the same prompts (cut from a fixed text so that they are exactly 32 and 512
tokens) greedily for exactly ``--new-tokens`` tokens (EOS does not stop them), with the same
onnxruntime (or torch, or llama.cpp) threads, and reports the time to the first token (TTFT)
and decode tokens/s (the tokens after the first over their time); medians over ``--rounds``
rounds in which the sides alternate (the order rotates each round; these machines are noisy):

  (a) the limit: optimum's one-graph export, KV preallocated and IO-bound, in this process
      (bench/generate_limit.py; no appliance code);
  (b) the appliance's runtime in this process: DecoderSpan over the package's segments as 1 span
      and as 3 spans chained, fp32 and int4 (bench/generate_inproc.py);
  (c) ``appliance serve`` with 1, 2 and 3 local nodes (one span each), fp32 and int4, through
      its OpenAI-compatible ``POST /v1/completions`` stream (bench/generate_http.py); skipped,
      saying why, where the server has no such route or it fails. The six rings stay up for
      the whole run, each stopped (SIGSTOP) except during its own rounds (``--no-pause``:
      left running), so their idle heartbeats do not load the cores the others measure on;
  (d) PyTorch ``generate`` on the same fp32 weights;
  (e) llama.cpp (llama-cpp-python, in bench/.llama-venv) on the very same GGUF (Q4_1 weights).

Exports are made once and kept by name under ``--work`` (default build/generate-bench).
A JSON report goes to bench/results (or ``--out``), a PNG beside it where matplotlib is
installed. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import generate_report
from bench.generate_common import (
    PRECISIONS,
    Prompt,
    Round,
    Side,
    build_prompt,
    prompt_text,
    say,
    smollm2_gguf,
    summarise,
    unset,
)
from bench.generate_http import Served
from bench.generate_report import machine_load, versions
from bench.report import save_report

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK = ROOT / "build" / "generate-bench"
MODEL = "smollm2"
SIDES = "abcde"


def make_prompts(work: Path, lengths: list[int]) -> list[Prompt]:
    from tokenizers import Tokenizer

    from bench.generate_limit import ensure_hf_folder

    tokenizer = Tokenizer.from_file(str(ensure_hf_folder(work, say) / "tokenizer.json"))

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=False))

    prompts = []
    for n in lengths:
        text, ids = build_prompt(encode, decode, prompt_text(), n)
        prompts.append(Prompt(n, text, ids))
    return prompts


def limit_side(work: Path, threads: int, capacity: int) -> Side:
    from bench.generate_limit import LimitRunner, check_variant, ensure_limit_graph

    graph = ensure_limit_graph(work, say)
    diff = check_variant(graph, threads)
    runner = LimitRunner(graph, threads, capacity)
    settings = {
        "graph": str(graph),
        "kv": "two preallocated buffers per past tensor, IO-bound, swapped each step",
        "lm_head": "last position only (Slice before the LM head MatMul)",
        "variant_max_abs_diff_vs_optimum_graph": diff,
        "onnxruntime_threads": threads,
    }
    return Side(
        "a",
        "limit",
        "(a) limit: optimum graph, prealloc KV",
        "fp32",
        lambda p, n: runner.generate(p.ids, n),
        settings,
    )


def appliance_sides(work: Path, threads: int, prompts: list[Prompt]) -> list[Side]:
    from bench.generate_inproc import (
        ApplianceRunner,
        ensure_package,
        package_encodes,
        quantization_figures,
    )

    sides = []
    for precision in PRECISIONS:
        repo = ensure_package(work, precision, say)
        for prompt in prompts:  # what a server tokenising the text will see
            if package_encodes(repo, prompt.text) != prompt.ids:
                say(f"warning: the {precision} package's tokenizer cuts the prompt differently")
        for spans in (1, 3):
            say(f"loading the {precision} package as {spans} span(s)")
            runner = ApplianceRunner(repo, spans, threads)
            what = "1 span" if spans == 1 else f"{spans} spans chained"
            sides.append(
                Side(
                    "b",
                    f"runtime-{spans}span-{precision}",
                    f"(b) runtime, {what}",
                    precision,
                    lambda p, n, r=runner: r.generate(p.ids, n),  # type: ignore[misc]
                    {
                        "spans": runner.stages,
                        "onnxruntime_threads": threads,
                        "quantization": quantization_figures(repo),
                    },
                )
            )
    return sides


def torch_side(work: Path, threads: int) -> Side:
    from bench.generate_inproc import TorchRunner
    from bench.generate_limit import ensure_hf_folder

    say("loading the fp32 weights into PyTorch")
    runner = TorchRunner(ensure_hf_folder(work, say), threads)
    return Side(
        "d",
        "pytorch",
        "(d) PyTorch generate",
        "fp32",
        lambda p, n: runner.generate(p.ids, n),
        {"torch_threads": runner.threads},
    )


def llama_side(threads: int, capacity: int, build: bool, venv: Path) -> Side:
    from bench import llama_cpp

    if not build and not llama_cpp.llama_built(venv):
        side = Side(
            "e", "llama.cpp", f"(e) {llama_cpp.LABEL}", "Q4_1", lambda p, n: Round(0, 0, [])
        )
        side.skipped = f"{venv} is not built (--quick skips the ~5 min build; run without it)"
        return side
    try:
        python = llama_cpp.ensure_llama_venv(venv)
        driver = llama_cpp.LlamaDriver(python, smollm2_gguf(), threads, capacity + 16)
    except (llama_cpp.LlamaBenchError, OSError, subprocess.SubprocessError) as exc:
        side = Side("e", "llama.cpp", f"(e) {llama_cpp.LABEL}", "Q4_1", unset)
        side.skipped = f"llama.cpp did not start: {exc}"
        return side
    settings = {k: v for k, v in driver.settings.items() if k != "kind"}
    settings["note"] = llama_cpp.ONE_SEQUENCE

    def run(prompt: Prompt, n: int) -> Round:
        out = driver.run(prompt.ids, n)
        return Round(out["ttft_s"], out["decode_s"], out["tokens"])

    return Side(
        "e", "llama.cpp", f"(e) {llama_cpp.LABEL}", "Q4_1", run, settings, close=driver.close
    )


def _attempt(side: Side, prompt: Prompt, n: int, when: str) -> Round | None:
    """One run; a side that raises is skipped from then on, saying when and why."""
    try:
        return side.run(prompt, n)
    except Exception as exc:  # a server gone, a driver crashed: the other sides go on
        side.skipped = f"failed in {when} ({prompt.tokens}-token prompt): {exc!r}"
        say(f"  {side.label} {side.precision}: {side.skipped}")
        return None


def measure(sides: list[Side], prompts: list[Prompt], rounds: int, new_tokens: int) -> None:
    live = [s for s in sides if s.skipped is None]
    say(f"warm-up: {len(live)} side(s) x {len(prompts)} prompt(s), 4 tokens each")
    for side in live:
        for prompt in prompts:
            if side.skipped is None:
                _attempt(side, prompt, min(4, new_tokens), "the warm-up")
    for r in range(rounds):
        live = [s for s in live if s.skipped is None]
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for prompt in prompts:
            for side in order:
                if side.skipped is not None:
                    continue
                result = _attempt(side, prompt, new_tokens, f"round {r + 1}")
                if result is None:
                    continue
                if r > 0:
                    result.extra.pop("text", None)
                side.rounds.setdefault(prompt.tokens, []).append(result)
                say(
                    f"  round {r + 1}/{rounds}  prompt {prompt.tokens:>4}  "
                    f"{side.label + ' ' + side.precision:<46} TTFT {result.ttft_s * 1000:8.1f} ms"
                    f"  {result.decode_tok_s:6.1f} tok/s"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median)")
    parser.add_argument("--prompts", default="32,512", help="prompt lengths in tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="threads of every side")
    parser.add_argument("--sides", default=",".join(SIDES), help="any of a,b,c,d,e")
    parser.add_argument("--quick", action="store_true", help="32-token prompt, 32 new, 1 round")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="exports kept here")
    parser.add_argument("--llama-venv", type=Path, default=None, help="default bench/.llama-venv")
    parser.add_argument("--serve-timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--no-pause",
        action="store_true",
        help="leave the servers of side (c) running between their turns (default: SIGSTOP "
        "each while the other sides run, so 6 idle rings do not load the cores)",
    )
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    wanted = {s.strip() for s in args.sides.split(",") if s.strip()}
    if not wanted or wanted - set(SIDES):
        parser.error(f"--sides: choose from {','.join(SIDES)}, got {args.sides!r}")
    lengths = [int(n) for n in args.prompts.split(",")]
    if args.quick:
        lengths, args.new_tokens, args.rounds = lengths[:1], 32, 1
    from bench import llama_cpp

    venv = args.llama_venv or llama_cpp.LLAMA_VENV
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = machine_load()
    busy = [(p["cmd"][:40], p["cpu_pct"]) for p in load_before["busy_processes"]]
    say(f"machine: {os.cpu_count()} cores, load {load_before['loadavg']}, busy: {busy or 'none'}")
    prompts = make_prompts(args.work, lengths)
    capacity = max(lengths) + args.new_tokens + 1
    sides: list[Side] = []
    served: Served | None = None
    try:
        if "a" in wanted:
            sides.append(limit_side(args.work, args.threads, capacity))
        if "b" in wanted:
            sides += appliance_sides(args.work, args.threads, prompts)
        if "d" in wanted:
            sides.append(torch_side(args.work, args.threads))
        if "e" in wanted:
            sides.append(llama_side(args.threads, capacity, not args.quick, venv))
        if "c" in wanted:
            served = Served(args.work, args.serve_timeout_s, not args.no_pause)
            sides += served.sides(prompts[0])
        for side in sides:
            if side.skipped:
                say(f"skipping {side.label} {side.precision}: {side.skipped}")
        measure(sides, prompts, args.rounds, args.new_tokens)
    finally:
        for side in sides:
            if side.close is not None:
                side.close()
        if served is not None:
            served.close()
    report = {
        "bench": "generate",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": str(smollm2_gguf()),
        "settings": {
            "threads": args.threads,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "order": "alternating: each round runs every side once per prompt, order rotated",
            "sampling": "greedy; EOS ignored (PyTorch: min_new_tokens = max_new_tokens)",
            "quick": args.quick,
        },
        "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "before": load_before, "after": machine_load()},
        "prompts": [{"tokens": p.tokens, "text": p.text} for p in prompts],
        "sides": {
            s.name: {
                "side": s.key,
                "label": s.label,
                "precision": s.precision,
                "settings": s.settings,
                "skipped": s.skipped,
                "results": {str(n): summarise(rs) for n, rs in s.rounds.items()},
            }
            for s in sides
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    tokens = {s.name: {n: rs[0].tokens for n, rs in s.rounds.items()} for s in sides}
    report["summary"] = generate_report.summary(report, tokens)
    path = save_report(report, args.out, f"generate-{MODEL}")
    print(generate_report.table(report))
    plot = generate_report.plot(report, path.with_suffix(".png"))
    if plot is not None:
        print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
