"""llama.cpp driver for bench/llama_cpp.py: runs in bench/.llama-venv (llama-cpp-python), never
in the project's venv, and imports nothing of the project.

    python llama_driver.py '{"model": PATH, "threads": 2, "context": 1024, "mark": "LLAMABENCH "}'

Prints ``MARK {"kind": "ready", ...}``, then answers each JSON line on stdin,
``{"prompt_ids": [...], "new_tokens": N}``, with ``MARK {"kind": "round", "ttft_s", "decode_s",
"tokens", "cpu_s"}``: the prompt evaluated from an empty cache, then N greedy tokens (EOS is not
a stop: ``Llama.generate`` never stops by itself). Ends at EOF.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def main() -> int:
    # run as a script from bench/, whose llama_cpp.py would shadow the real llama_cpp package
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    config = json.loads(sys.argv[1])
    mark = config["mark"]

    def say(record: dict[str, Any]) -> None:
        print(mark + json.dumps(record), flush=True)

    try:
        import llama_cpp

        threads = int(config["threads"])
        llm = llama_cpp.Llama(
            model_path=config["model"],
            n_ctx=int(config["context"]),
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            seed=0,
            verbose=False,
        )
    except Exception as exc:  # whatever fails to start is reported, not raised
        say({"kind": "error", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    say(
        {
            "kind": "ready",
            "llama_cpp_python": llama_cpp.__version__,
            "threads": threads,
            "n_ctx": llm.n_ctx(),
            "n_batch": 512,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        }
    )
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        prompt = [int(i) for i in request["prompt_ids"]]
        wanted = int(request["new_tokens"])
        try:
            llm.reset()  # n_tokens = 0: no prefix reuse, the prompt is evaluated afresh
            tokens: list[int] = []
            times: list[float] = []
            cpu = time.process_time()
            started = time.perf_counter()
            for token in llm.generate(
                prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
            ):
                times.append(time.perf_counter())
                tokens.append(int(token))
                if len(tokens) >= wanted:
                    break
            cpu = time.process_time() - cpu
        except Exception as exc:
            say({"kind": "error", "error": f"{type(exc).__name__}: {exc}"})
            return 1
        say(
            {
                "kind": "round",
                "ttft_s": times[0] - started,
                "decode_s": times[-1] - times[0],
                "tokens": tokens,
                "cpu_s": cpu,
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
