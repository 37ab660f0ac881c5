"""Export + cut + verify of a ~1 GB decoder, and the memory of a node holding part of it.

    python -m bench.export                  # Llama-style decoder, ~1 GB of fp32 weights
    python -m bench.export --layers 2 --hidden 256 --vocab 4096   # a small trial

Prints (and writes as JSON): export wall time and peak RSS (aim: under 3x the model's bytes), and
the RSS after warm-up of a process holding one quarter of the segments versus the whole model
(aim, docs/design.md: <= 1.15 x span bytes + 150 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import save_report

_MAKE_MODEL = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
hidden, layers, vocab, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
    num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
    num_key_value_heads=max(1, hidden // 256), vocab_size=vocab, max_position_embeddings=512,
    tie_word_embeddings=False)
model = LlamaForCausalLM(config)
model.save_pretrained(out, safe_serialization=True)
print(sum(p.numel() for p in model.parameters()) * 4)
"""

_HOLD_SPAN = """
import sys, json, psutil
from pathlib import Path
from runtime.package import open_package, load_span
from runtime.session import SessionSettings
from runtime.signature import sample_inputs
repo, name, first, last = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
package = open_package(repo, name)
runner = load_span(package, SessionSettings(device="cpu"), first, last)
feeds = sample_inputs(runner.signature, 1, 16)
if "input_ids" in feeds:
    feeds["input_ids"] = feeds["input_ids"] % 100
runner.run(feeds)
span = sum(s.bytes for s in package.segments[first:last + 1])
print(json.dumps({"rss": psutil.Process().memory_info().rss, "span_bytes": span}))
"""


def _run(args: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{args[:4]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        model_bytes = int(
            _run(
                [
                    sys.executable,
                    "-c",
                    _MAKE_MODEL,
                    str(args.hidden),
                    str(args.layers),
                    str(args.vocab),
                    str(work / "hf"),
                ],
                env,
            )
        )
        repo = work / "repo"
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        _run(
            [
                sys.executable,
                "-m",
                "appliance.cli",
                "export",
                str(work / "hf"),
                "--model-repo",
                str(repo),
                "--name",
                "llama",
                "--stages",
                "4",
                "--task",
                "text-generation",
            ],
            env,
        )
        export_s = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        manifest = json.loads((repo / "llama" / "1" / "manifest.json").read_text())
        segments = manifest["segments"]
        package_bytes = sum(s["bytes"] for s in segments)
        quarter = manifest["default_stages"][0]
        held = {}
        for label, (first, last) in {"quarter": quarter, "whole": [0, len(segments) - 1]}.items():
            held[label] = json.loads(
                _run([sys.executable, "-c", _HOLD_SPAN, str(repo), "llama", str(first), str(last)])
            )
    report: dict[str, Any] = {
        "bench": "export",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": f"llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}",
        "model_bytes": model_bytes,
        "package_bytes": package_bytes,
        "segments": len(segments),
        "export_seconds": round(export_s, 1),
        "export_peak_rss": peak,
        "peak_over_model": round(peak / model_bytes, 2),
        "peak_rss_before": before * 1024,
        "held": held,
        "verification": manifest["verification"],
    }
    mib = 2**20
    print(f"model: {report['model']}, {model_bytes / mib:.0f} MiB fp32, {len(segments)} segments")
    print(
        f"export + cut + verify: {export_s:.1f} s, peak RSS {peak / mib:.0f} MiB "
        f"= {peak / model_bytes:.2f} x model bytes (aim < 3x)"
    )
    for label, row in held.items():
        aim = 1.15 * row["span_bytes"] + 150 * mib
        print(
            f"holding {label}: span {row['span_bytes'] / mib:.0f} MiB, RSS after warm-up "
            f"{row['rss'] / mib:.0f} MiB (aim <= {aim / mib:.0f} MiB)"
        )
    save_report(report, args.out, "export")
    return 0


if __name__ == "__main__":
    sys.exit(main())
