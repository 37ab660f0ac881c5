"""Generation under concurrency, SmolLM2-135M: continuous batching, its peers, prefix reuse.

    python -m bench.generate_batch                 # 1/4/16/32 streams x 128 new tokens, 3 rounds
    python -m bench.generate_batch --quick         # 1/4/16 streams x 32 tokens, 1 round
    python -m bench.generate_batch --sides L,L0,O   # any of SIDES (L-int4, S1-int4 included)
    python -m bench.generate_batch --device cuda --sides L-iob,L-no-iob,S1   # on a GPU

Side by side, rounds alternating (the order rotates each round), medians over rounds; every
side decodes the same N prompts (ids from the package's tokenizer, or their text for a server)
greedily for exactly ``--new-tokens`` tokens, EOS ignored:

  (L) the in-process batched limit, fp32: the appliance's ``DecoderSpan`` over the whole package,
      each prompt prefilled alone, then every stream's decode step as ONE batch per token,
      argmax in numpy: no HTTP, no scheduler, no sampling (what batching could give at best);
  (L-iob), (L-no-iob) (L) with its decode steps through onnxruntime IO binding (the batch's KV
      kept where the session put it: GPU memory on CUDA) and without (every present copied to
      numpy); (L) itself does as ``decode_io_binding = auto`` says: on CUDA only;
  (L0) the same with the design before runtime/batch_kv.py (``keep_batches`` off: every batched
      step gathers the pasts into fresh padded arrays and copies each row's tokens back out);
  (O) the independent limit extended to batches, fp32: optimum's one-graph export in plain
      onnxruntime (no appliance code), KV preallocated and IO-bound, the N prompts left-padded
      into one prefill, then one [N, 1] decode batch per token (bench/generate_limit.py);
  (P) PyTorch ``generate`` on the same fp32 weights (the GGUF dequantised by transformers), the
      N prompts left-padded into one batch, torch threads = the machine's cores;
  (C) llama.cpp on the very same GGUF (Q4_1 weights, not fp32), in bench/.llama-venv: N
      sequences of one context through llama-cpp-python's low-level API (``llama_decode`` with
      one seq_id per stream), each prompt prefilled alone, then one decode batch per token.
      Its ``Llama`` class runs one sequence at a time; this is llama.cpp's own batching;
  (S1), (S3) ``appliance serve`` with 1 node (1 span) and 3 nodes (3 spans), fp32, N concurrent
      streamed ``POST /v1/completions`` (greedy, ignore_eos), each chunk's arrival timed,
      with the default settings (a step queued behind others waits: the coordinator gives a
      chain up only when a node stops answering a probe);
  (S1-1by1) the same as (S1) with ``--no-group-steps``, the design before grouped steps: a
      call per sequence and step from the coordinator to the node;
  (S1-no-ahead) the same as (S1) with nodes that do not decode ahead (``decode_ahead =
      false`` through ``--node-config``): each step waits for the coordinator to send the
      token back, the design before it;
  (S1-1p) the same as (S1) with ``--in-process-node``: the node in the coordinator's process,
      its steps function calls, not loopback HTTP; (S3-1p) (S3) with its first node so;
  (S3-1c) (S3) with nodes that run every decode step waiting as one batch (``decode_cohorts =
      1``), the design before cohorts;
  (S3-t2) (S3) with ``--node-threads 2``: each node's runs on 2 onnxruntime threads, not the
      cores divided among the 3 nodes;
  (S3-no-alone) (S3) with ``--node-alone-threads 0``: no alone sessions, every step on the
      node's 1 thread, the design before them;
  (S1-int4) the same as (S1) with the int4 package (MatMulNBits weights, block 32);
  (L-int4) (L) on that int4 package: S1-int4's own limit (``int4_ratio_to_int4_limit``).

Per (side, streams): aggregate tokens/s (all streams' tokens over the wall time from the first
request to the last token), p50/p99 inter-token latency (gaps between a stream's tokens, over
all streams; for the batched in-process sides, the step time), TTFT p50 (request to first
token). Ratios: each side's aggregate over (L)'s and over (O)'s; the 16-stream aggregates over
llama.cpp's best.

Then TTFT of a prompt made of a repeated 400-token system prompt and a short, different user
turn, prefix reuse on vs off, in this process without HTTP (``runtime.decoder_registry``: the
node's slot, its batcher and prefix cache, as a node's open/step handlers call them): TTFT =
open + first step.

JSON via bench/report.py (stem ``generate-batch``). Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench import generate_batch_sides as peers
from bench.generate_common import prompt_text, say
from bench.generate_http import ROUTE, ServeProcess, SseParser
from bench.generate_inproc import PACKAGE_NAME, ensure_package, package_encoder, package_encodes
from bench.report import save_report

if TYPE_CHECKING:
    from runtime.session import Device, IoBinding

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK = ROOT / "build" / "generate-bench"
SYSTEM_TOKENS = 400


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def figures(starts: list[float], times: list[list[float]]) -> dict[str, float]:
    """Aggregate tokens/s, ITL p50/p99 and TTFT p50 from each stream's start and token times."""
    tokens = sum(len(t) for t in times)
    wall = max(t[-1] for t in times) - min(starts)
    gaps = [b - a for t in times for a, b in zip(t, t[1:], strict=False)]
    ttft = [t[0] - s for s, t in zip(starts, times, strict=True)]
    return {
        "aggregate_tok_s": round(tokens / wall, 1),
        "itl_p50_ms": round(1000 * percentile(gaps, 50), 1),
        "itl_p99_ms": round(1000 * percentile(gaps, 99), 1),
        "ttft_p50_ms": round(1000 * percentile(ttft, 50), 1),
        "tokens": tokens,
    }


def stream_prompts(count: int, text: str) -> list[str]:
    """``count`` different prompts: the text rotated to different offsets, cut to 200-280
    characters (~40-70 tokens)."""
    text = text * (1 + 600 // max(1, len(text)))
    step = max(1, (len(text) - 300) // 37)
    return [text[(i * step) % 300 :][: 200 + 20 * (i % 5)] for i in range(count)]


class Limit:
    """(L): one DecoderSpan over every segment; decode of all streams as one batch. (L0):
    the same, its decode batches not kept between steps."""

    def __init__(
        self,
        repo: Path,
        threads: int,
        keep_batches: bool = True,
        device: Device = "cpu",
        io_binding: IoBinding = "auto",
    ) -> None:
        from runtime.decoder_load import load_decoder_span
        from runtime.package import open_package
        from runtime.session import SessionSettings

        package = open_package(repo, PACKAGE_NAME)
        settings = SessionSettings(device=device, intra_op_threads=threads,
                                   decode_io_binding=io_binding)  # fmt: skip
        self.span = load_decoder_span(package, settings, 0, len(package.segments) - 1)
        self.span.keep_batches = keep_batches
        self.settings = {"onnxruntime_threads": threads, "prefill": "each prompt alone",
                         "keep_batches": keep_batches, "device": self.span.device,
                         "io_binding": self.span.io_binding}  # fmt: skip

    def run(self, texts: list[str], ids: list[list[int]], new: int) -> dict[str, float]:
        kvs = [self.span.empty_kv() for _ in ids]
        starts = [time.perf_counter()] * len(ids)  # all requests arrive at once
        times: list[list[float]] = [[] for _ in ids]
        tokens = []
        for i, prompt in enumerate(ids):
            logits = self.span.step([kvs[i]], np.array([prompt]))
            tokens.append(int(np.argmax(logits[0])))
            times[i].append(time.perf_counter())
        for _ in range(new - 1):
            logits = self.span.step(kvs, np.array([[t] for t in tokens]))
            tokens = [int(t) for t in np.argmax(logits, axis=1)]
            now = time.perf_counter()
            for t in times:
                t.append(now)
        return figures(starts, times)


async def timed_stream(session: Any, url: str, prompt: str, new: int) -> tuple[float, list[float]]:
    """One streamed completion: its start and the arrival time of each chunk with text."""
    body = {"model": PACKAGE_NAME, "prompt": prompt, "max_tokens": new, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    started = time.perf_counter()
    times: list[float] = []
    async with session.post(url.rstrip("/") + ROUTE, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"POST {ROUTE} answered {r.status}: {(await r.text())[:300]}")
        parser = SseParser()
        async for data in r.content.iter_any():
            now = time.perf_counter()
            for event in parser.feed(data):
                if event == "[DONE]":
                    return started, times
                for choice in json.loads(event).get("choices") or []:
                    if choice.get("text"):
                        times.append(now)
    return started, times


class Serve:
    """(S1)/(S3)/(S1-int4): ``appliance serve --nodes K --stages K``, paused between its own
    rounds."""

    def __init__(self, repo: Path, nodes: int, work: Path, runner: asyncio.Runner,
                 precision: str = "fp32", extra: tuple[str, ...] = (),
                 variant: str = "") -> None:  # fmt: skip
        variant = variant or "".join(extra).strip("-")
        name = f"batch-{precision}-{nodes}" + (f"-{variant}" if variant else "")
        self.server = ServeProcess(repo, PACKAGE_NAME, nodes, work / name,
                                   work / "logs" / f"{name}.log", extra_args=extra)  # fmt: skip
        self.url = self.server.wait_listening(600)
        self.runner = runner
        self.session: Any = None
        self.server.pause()
        self.settings = {"command": self.server.command, "url": self.url}

    def run(
        self, texts: list[str], ids: list[list[int]], new: int, probe: Any = None
    ) -> dict[str, float]:
        """One round; ``probe``: a context manager held while the streams run (a profiler)."""
        import aiohttp

        async def go() -> list[tuple[float, list[float]]]:
            if self.session is None:
                timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
                self.session = aiohttp.ClientSession(timeout=timeout)
            return await asyncio.gather(
                *(timed_stream(self.session, self.url, p, new) for p in texts)
            )

        self.server.resume()
        time.sleep(0.5)
        try:
            with probe if probe is not None else contextlib.nullcontext():
                results = self.runner.run(go())
        finally:
            self.server.pause()
        return figures([s for s, _ in results], [t for _, t in results])

    def close(self) -> None:
        if self.session is not None:
            self.runner.run(self.session.close())
        self.server.stop()


async def prefix_ttft(
    repo: Path, threads: int, rounds: int, system: list[int], device: Device = "cpu"
) -> dict[str, Any]:
    """TTFT of system prompt + a different user turn, prefix reuse on vs off (runtime)."""
    from runtime.decoder_admission import DecoderLimits
    from runtime.decoder_registry import DecoderRegistry
    from runtime.package import open_package
    from runtime.sampling import SamplingParams
    from runtime.session import SessionSettings

    settings = SessionSettings(device=device, intra_op_threads=threads)
    last = len(open_package(repo, PACKAGE_NAME).segments) - 1
    registries = {}
    for mode, block in (("on", 32), ("off", 0)):
        registry = DecoderRegistry(repo, settings, lambda slots: 2 * 10**9, 600.0,
                                   DecoderLimits(prefix_block_tokens=block))  # fmt: skip
        await registry.load(PACKAGE_NAME, 1, 0, last, "s")
        registries[mode] = registry
    greedy = SamplingParams(temperature=0.0)
    ttft: dict[str, list[float]] = {"on": [], "off": []}
    computed: dict[str, list[int]] = {"on": [], "off": []}
    tokens: dict[str, list[int]] = {"on": [], "off": []}
    count = 0
    for r in range(rounds + 1):  # round 0 warms (and fills the cache of "on")
        for mode in ("on", "off") if r % 2 else ("off", "on"):
            slot = registries[mode].slots["s"]
            prompt = system + [int(t) for t in np.arange(10, 26) + 7 * r]  # same for both
            count += 1
            before = slot.prefill_tokens
            started = time.perf_counter()
            cached = await slot.open(f"q{count}", len(prompt) + 1, greedy, time.monotonic(),
                                     prompt)  # fmt: skip
            result = await slot.step(f"q{count}", cached, np.array([prompt[cached:]]),
                                     time.monotonic())  # fmt: skip
            elapsed = time.perf_counter() - started
            slot.close(f"q{count}")
            if r:
                ttft[mode].append(elapsed)
                computed[mode].append(slot.prefill_tokens - before)
                tokens[mode].append(int(result.token or 0))
    for registry in registries.values():
        registry.close()
    on, off = statistics.median(ttft["on"]), statistics.median(ttft["off"])
    return {
        "how": "runtime DecoderSlot in process (open + first step, no HTTP)",
        "prompt_tokens": len(system) + 16,
        "ttft_ms_on": round(1000 * on, 1),
        "ttft_ms_off": round(1000 * off, 1),
        "speedup": round(off / on, 2),
        "prefill_tokens_on": computed["on"],
        "prefill_tokens_off": computed["off"],
        "first_tokens_equal": tokens["on"] == tokens["off"],
    }


SIDES = ("L", "L-iob", "L-no-iob", "L0", "O", "P", "C", "S1", "S1-1by1", "S1-no-ahead", "S1-1p",
         "S3", "S3-1p", "S3-1c", "S3-t2", "S3-no-alone", "S1-int4", "L-int4")  # fmt: skip


def node_config(work: Path, name: str, toml: str) -> tuple[str, ...]:
    """``appliance serve`` flags giving its local nodes the settings ``toml`` (the design
    before a change, as a setting)."""
    path = work / f"node-{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml)
    return ("--node-config", str(path))


def make_sides(
    wanted: list[str],
    repo: Path,
    args: argparse.Namespace,
    threads: int,
    capacity: int,
    runner: asyncio.Runner,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The sides asked for, by JSON name; and those that did not start, with why."""
    from bench.llama_cpp import LlamaBenchError

    sides: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    streams = max(int(s) for s in args.streams.split(","))
    makers: list[tuple[str, str, Any]] = [
        ("L", "limit-inproc-batched", lambda: Limit(repo, threads, device=args.device)),
        ("L-iob", "limit-inproc-batched-io-binding",
         lambda: Limit(repo, threads, device=args.device, io_binding="on")),
        ("L-no-iob", "limit-inproc-batched-no-io-binding",
         lambda: Limit(repo, threads, device=args.device, io_binding="off")),
        ("L0", "limit-inproc-batched-before",
         lambda: Limit(repo, threads, keep_batches=False, device=args.device)),
        ("O", "limit-optimum-batched",
         lambda: peers.OptimumLimit(args.work, threads, capacity, streams, figures, say)),
        ("P", "pytorch-batched", lambda: peers.TorchBatch(args.work, figures, say)),
        ("C", "llama.cpp-batched", lambda: peers.LlamaBatch(threads, figures)),
        ("S1", "serve-1span", lambda: Serve(repo, 1, args.work, runner)),
        ("S1-1by1", "serve-1span-1by1",
         lambda: Serve(repo, 1, args.work, runner, extra=("--no-group-steps",))),
        ("S1-no-ahead", "serve-1span-no-ahead",
         lambda: Serve(repo, 1, args.work, runner,
                       extra=node_config(args.work, "no-decode-ahead", "decode_ahead = false\n"),
                       variant="no-decode-ahead")),
        ("S1-1p", "serve-1span-one-process",
         lambda: Serve(repo, 1, args.work, runner, extra=("--in-process-node",),
                       variant="one-process")),
        ("S3", "serve-3span", lambda: Serve(repo, 3, args.work, runner)),
        ("S3-1p", "serve-3span-one-process",
         lambda: Serve(repo, 3, args.work, runner, extra=("--in-process-node",),
                       variant="one-process")),
        ("S3-1c", "serve-3span-1cohort",
         lambda: Serve(repo, 3, args.work, runner,
                       extra=node_config(args.work, "1cohort", "decode_cohorts = 1\n"),
                       variant="1cohort")),
        ("S3-t2", "serve-3span-2threads",
         lambda: Serve(repo, 3, args.work, runner, extra=("--node-threads", "2"),
                       variant="2threads")),
        ("S3-no-alone", "serve-3span-no-alone",
         lambda: Serve(repo, 3, args.work, runner, extra=("--node-alone-threads", "0"),
                       variant="no-alone")),
        ("S1-int4", "serve-1span-int4",
         lambda: Serve(ensure_package(args.work, "int4", say), 1, args.work, runner, "int4")),
        ("L-int4", "limit-inproc-batched-int4",
         lambda: Limit(ensure_package(args.work, "int4", say), threads, device=args.device)),
    ]  # fmt: skip
    for key, name, make in makers:
        if key not in wanted:
            continue
        say(f"starting ({key}) {name}")
        try:
            sides[name] = make()
        except (LlamaBenchError, RuntimeError, OSError, ImportError) as exc:
            skipped[name] = f"did not start: {exc}"
            say(f"skipping {name}: {skipped[name]}")
    return sides, skipped


def main(argv: list[str] | None = None) -> int:
    from bench.generate_report import machine_load

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1/4/16 streams, 32 tokens, 1 round")
    parser.add_argument("--streams", default="1,4,16,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", default=",".join(SIDES), help="any of " + ",".join(SIDES))
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="the in-process sides' (serve's local nodes take CUDA where it is obtained)",
    )  # fmt: skip
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.quick:
        args.streams, args.new_tokens, args.rounds = "1,4,16", 32, 1
    wanted = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not wanted or set(wanted) - set(SIDES):
        parser.error(f"--sides: choose from {','.join(SIDES)}, got {args.sides!r}")
    streams = [int(s) for s in args.streams.split(",")]
    threads = os.cpu_count() or 1
    started_all = time.perf_counter()
    load_before = machine_load()
    busy = [(p["cmd"][:40], p["cpu_pct"]) for p in load_before["busy_processes"]]
    say(f"machine: {threads} cores, load {load_before['loadavg']}, busy: {busy or 'none'}")
    repo = ensure_package(args.work, "fp32", say)
    text = prompt_text()
    encode = package_encoder(repo)
    batches = {n: stream_prompts(n, text) for n in streams}
    ids = {n: [encode(p) for p in texts] for n, texts in batches.items()}
    capacity = max(len(i) for rows in ids.values() for i in rows) + args.new_tokens + 1
    runner = asyncio.Runner()
    sides, skipped = make_sides(wanted, repo, args, threads, capacity, runner)
    settings = {name: dict(getattr(side, "settings", {})) for name, side in sides.items()}
    results: dict[str, dict[int, list[dict[str, float]]]] = {n: {} for n in sides}
    names = list(sides)
    try:
        for r in range(args.rounds):
            for n in streams:
                order = names[r % len(names) :] + names[: r % len(names)] if names else []
                for name in order:
                    if name in skipped:
                        continue
                    try:
                        got = sides[name].run(batches[n], ids[n], args.new_tokens)
                    except Exception as exc:  # a server gone, a driver crashed: the rest go on
                        skipped[name] = f"failed in round {r + 1} at {n} streams: {exc!r}"
                        say(f"  {name}: {skipped[name]}")
                        continue
                    results[name].setdefault(n, []).append(got)
                    say(f"round {r + 1}/{args.rounds} {n:>2} streams {name}: {got}")
        system = package_encodes(repo, text * (1 + 5 * SYSTEM_TOKENS // len(text)))[:SYSTEM_TOKENS]
        say("prefix reuse: TTFT of a repeated 400-token system prompt, on vs off")
        prefix = runner.run(
            prefix_ttft(repo, threads, max(3, args.rounds * 2), system, args.device)
        )
        say(f"prefix reuse: {prefix}")
    finally:
        for side in sides.values():
            if hasattr(side, "close"):
                side.close()
        runner.close()
    for name, side in sides.items():  # what a side learnt while running (llama's contexts)
        settings[name] = dict(getattr(side, "settings", settings[name]))
    report = peers.summarise(results, args.new_tokens, args.rounds, threads, prefix)
    report["sides"] = {
        name: {"key": key, "label": label, "precision": precision,
               "settings": settings.get(name), "skipped": skipped.get(name)}
        for name, (key, label, precision) in peers.LABELS.items()
        if name in sides or name in skipped
    }  # fmt: skip
    report["loadavg_before"] = load_before["loadavg"]
    after = machine_load()
    report["loadavg_after"] = after["loadavg"]
    report["machine"] = {"cpus": threads, "before": load_before, "after": after}
    report["seconds"] = round(time.perf_counter() - started_all, 1)
    print(json.dumps({k: report[k] for k in ("medians", "ratio_to_limit", "prefix_reuse")},
                     indent=1))  # fmt: skip
    print(peers.table(report))
    save_report(report, args.out, "generate-batch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
