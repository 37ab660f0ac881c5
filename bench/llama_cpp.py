"""llama.cpp, through ``llama-cpp-python``, for bench/generate.py's side (e).

llama-cpp-python is not a project dependency: it lives in a virtual environment of its own,
``bench/.llama-venv`` (made on first use: ``pip install llama-cpp-python`` builds llama.cpp from
source, about 5 minutes on 2 cores; its progress is shown). The model runs in a subprocess of
that venv, ``bench/llama_driver.py``, which stays up for the whole bench and answers one round
per request on its stdin, so llama.cpp's rounds alternate with the other sides' like theirs do.

    python -m bench.llama_cpp --build        # make the venv (once) and print its versions

The driver takes token ids, not text (every side decodes the very same prompt ids), evaluates
the prompt from an empty cache each round and samples greedily past end-of-sequence (its
low-level ``Llama.generate``, which never stops by itself). llama-cpp-python's ``Llama`` runs one
sequence at a time: that is bench/generate.py's single-stream figure. bench/generate_batch.py's
batched side asks the same driver for ``run_batch``: N sequences of one llama.cpp context
decoded as one batch per step through the library's low-level API (``llama_decode`` with one
``seq_id`` per sequence), which ``Llama`` itself does not offer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

LLAMA_VENV = Path(__file__).resolve().parent / ".llama-venv"
DRIVER = Path(__file__).resolve().parent / "llama_driver.py"
PACKAGE = "llama-cpp-python"
MARK = "LLAMABENCH "
LABEL = "llama.cpp (Q4_1 weights)"
ONE_SEQUENCE = "llama-cpp-python's Llama runs one sequence at a time (no batching across requests)"
BATCHED = (
    "llama-cpp-python's Llama runs one sequence at a time; this side uses its low-level API "
    "(llama_batch_init, llama_decode with one seq_id per stream, n_seq_max = streams) to decode "
    "all streams as one batch per step, greedy argmax per stream in the driver"
)
_IMPORT_CHECK = "import llama_cpp"
_VERSION = "import llama_cpp; print(llama_cpp.__version__)"
_MAKE_STEP = re.compile(r"\[\s*(\d+)%\]")  # make: [ 45%]
_NINJA_STEP = re.compile(r"\[(\d+)/(\d+)\]")  # ninja: [39/193]


class LlamaBenchError(RuntimeError):
    pass


def llama_python(path: Path = LLAMA_VENV) -> Path:
    return path / "bin" / "python"


def llama_built(path: Path = LLAMA_VENV) -> bool:
    """Whether ``path`` holds a venv that imports llama_cpp (nothing is built or installed)."""
    python = llama_python(path)
    if not python.exists():
        return False
    check = subprocess.run(
        [str(python), "-c", _IMPORT_CHECK], capture_output=True, timeout=120, check=False
    )
    return check.returncode == 0


def _base_python() -> str:
    # the interpreter the project's venv was made from: a venv of a venv would work too, but
    # this one does not depend on the project's venv staying where it is
    base = getattr(sys, "_base_executable", None)
    return base if base and Path(base).exists() else shutil.which("python3") or sys.executable


def ensure_llama_venv(
    path: Path = LLAMA_VENV, out: IO[str] | None = None, timeout_s: float = 3600
) -> Path:
    """The venv's python, made and filled (``pip install llama-cpp-python``, built from source)
    unless it already imports llama_cpp. The build's progress goes to ``out`` (default stderr),
    its full log to ``{path}/build.log``."""
    out = out or sys.stderr
    python = llama_python(path)
    if llama_built(path):
        return python
    path.parent.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        subprocess.run([_base_python(), "-m", "venv", "--clear", str(path)], check=True)
    log_path = path / "build.log"
    print(
        f"building {PACKAGE} in {path} (llama.cpp from source, ~5 min on 2 cores; log {log_path})",
        file=out,
        flush=True,
    )
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-v", PACKAGE]
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert process.stdout is not None
        last = ""
        for line in process.stdout:
            log.write(line)
            status = _build_status(line)
            if status and status != last:
                last = status
                elapsed = time.monotonic() - started
                print(f"\r  {status:<60.60} {elapsed:5.0f}s", end="", file=out, flush=True)
            if time.monotonic() - started > timeout_s:
                process.kill()
                break
        rc = process.wait()
    print(file=out, flush=True)
    if rc != 0 or not llama_built(path):
        tail = log_path.read_text(errors="replace")[-3000:]
        raise LlamaBenchError(f"pip install {PACKAGE} failed (rc {rc}); log tail:\n{tail}")
    print(f"built {PACKAGE} in {time.monotonic() - started:.0f}s", file=out, flush=True)
    return python


def _build_status(line: str) -> str | None:
    """A short progress note from one line of pip -v / cmake output, or None."""
    ninja = _NINJA_STEP.search(line)
    make = None if ninja else _MAKE_STEP.search(line)
    match = ninja or make
    if match is not None:
        done = int(match.group(1)) if make else 100 * int(match.group(1)) // int(match.group(2))
        words = line[match.end() :].split()
        outputs = [w for w in words if w.endswith(".o") or w.endswith(".so")]
        what = outputs[-1] if outputs else (words[-1] if words else "")
        return f"[{done:3d}%] {what.split('/')[-1]}"
    text = line.strip()
    for start in ("Collecting", "Downloading", "Building wheel", "Installing", "Successfully"):
        if text.startswith(start):
            return text
    if "-- Configuring" in text or "-- Build files" in text:
        return text.lstrip("- ")
    return None


def llama_version(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", _VERSION], capture_output=True, text=True, timeout=120, check=True
    )
    return out.stdout.strip()


class LlamaDriver:
    """The driver subprocess: one ``Llama`` on ``model`` with ``threads`` threads; ``run``
    asks it for one greedy round."""

    def __init__(
        self, python: Path, model: Path, threads: int, context: int, timeout_s: float = 300
    ) -> None:
        config = {"model": str(model), "threads": threads, "context": context, "mark": MARK}
        self.timeout_s = timeout_s
        self.process = subprocess.Popen(
            [str(python), "-P", str(DRIVER), json.dumps(config)],  # -P: bench/ not on sys.path
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.settings = self._read()
        if self.settings.get("kind") != "ready":
            self.close()
            raise LlamaBenchError(f"llama driver did not start: {self.settings}")

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if not line:
                err = self.process.stderr.read()[-3000:] if self.process.stderr else ""
                raise LlamaBenchError(f"llama driver exited (rc {self.process.poll()}):\n{err}")
            if line.startswith(MARK):
                record: dict[str, Any] = json.loads(line[len(MARK) :])
                if record.get("kind") == "error":
                    raise LlamaBenchError(f"llama driver: {record.get('error')}")
                return record

    def run(self, prompt_ids: list[int], new_tokens: int) -> dict[str, Any]:
        """{"ttft_s", "decode_s", "tokens": [...], "cpu_s"} of one round from an empty cache."""
        assert self.process.stdin is not None
        request = {"prompt_ids": [int(i) for i in prompt_ids], "new_tokens": int(new_tokens)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def run_batch(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        """{"times": [[s, ...]], "tokens": [[...]], "cpu_s", "context"}: the prompts as one
        context's sequences, each prefilled alone, then decoded as one batch per step; times
        in seconds from the round's start."""
        assert self.process.stdin is not None
        request = {
            "batch": [[int(i) for i in p] for p in prompts],
            "new_tokens": int(new_tokens),
            "per_sequence": max(len(p) for p in prompts) + int(new_tokens) + 8,
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            if self.process.stdin is not None:
                with contextlib.suppress(OSError):
                    self.process.stdin.close()  # the driver ends at EOF
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--build", action="store_true", help="make the venv unless it exists")
    parser.add_argument("--venv", type=Path, default=LLAMA_VENV)
    args = parser.parse_args(argv)
    if args.build:
        python = ensure_llama_venv(args.venv)
    elif llama_built(args.venv):
        python = llama_python(args.venv)
    else:
        print(f"{args.venv} has no {PACKAGE}; run with --build", file=sys.stderr)
        return 1
    print(f"{PACKAGE} {llama_version(python)} in {args.venv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
