"""Run ``convert`` in a child process, so the PyTorch model and the exporter's own peak are
returned to the OS before the ONNX model is cut (Python seldom gives freed memory back).

    python -m exporter.isolated SOURCE WORKDIR '{"task": null, "opset": 17}'
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from exporter import errors
from exporter.convert import Converted, convert

_RESULT = "converted.pickle"
_ERROR = "error.json"


def convert_isolated(source: str, workdir: Path, task: str | None, opset: int) -> Converted:
    workdir.mkdir(parents=True, exist_ok=True)
    options = json.dumps({"task": task, "opset": opset})
    done = subprocess.run(
        [sys.executable, "-m", "exporter.isolated", source, str(workdir), options],
        env={**os.environ},
        check=False,
    )
    if done.returncode != 0:
        raise _error_from(workdir / _ERROR, done.returncode)
    with open(workdir / _RESULT, "rb") as handle:
        raw: dict[str, Any] = pickle.load(handle)  # written just now by our own child
    raw["onnx_path"] = Path(raw["onnx_path"])
    return Converted(**raw)


def _error_from(path: Path, code: int) -> errors.ExportError:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return errors.ExportError(f"the conversion process failed (exit status {code})")
    cls = getattr(errors, str(raw.get("type")), errors.ExportError)
    if not (isinstance(cls, type) and issubclass(cls, errors.ExportError)):
        cls = errors.ExportError
    return cls(str(raw.get("message")))


def _main(argv: list[str]) -> int:
    source, workdir, options = argv[0], Path(argv[1]), json.loads(argv[2])
    try:
        converted = convert(
            source, workdir / "convert", task=options["task"], opset=options["opset"]
        )
    except errors.ExportError as exc:
        (workdir / _ERROR).write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        return 3
    except Exception as exc:  # a bug or an exporter crash: reported, not swallowed
        traceback.print_exc()
        (workdir / _ERROR).write_text(
            json.dumps(
                {
                    "type": "ExportError",
                    "message": f"conversion failed: {type(exc).__name__}: {exc}",
                }
            )
        )
        return 3
    payload = asdict(converted)
    payload["onnx_path"] = str(converted.onnx_path)
    with open(workdir / _RESULT, "wb") as handle:
        pickle.dump(payload, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
