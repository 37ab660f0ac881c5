"""The optional dependencies of the exporter (the ``export`` extra), imported when needed, and
the hub kept offline: these machines reach no model hub."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

from exporter.errors import MissingExtra

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install the export extra: pip install 'onnx-appliance[export]' (it brings torch: to "
    "avoid a multi-gigabyte CUDA build on a CPU-only machine, install a CPU torch wheel first)"
)
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

# ---------------------------------------------------------------------------- optional extras


def _require(module: str, needed_by: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(
            f"{needed_by} needs {module}, which cannot be imported ({exc}); {INSTALL_HINT}"
        ) from exc


@contextmanager
def _offline() -> Iterator[None]:
    """Never reach the Hugging Face hub: the machines have no network but PyPI."""
    saved = {name: os.environ.get(name) for name in _OFFLINE_VARS}
    os.environ.update({name: "1" for name in _OFFLINE_VARS})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
