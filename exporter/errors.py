"""Typed errors of the exporter package (DESIGN.md "Conventions": one errors.py per package)."""

from __future__ import annotations


class ExportError(Exception):
    """Base of every error raised by ``exporter``: the model or package could not be produced."""


class PackageExists(ExportError):
    """The package version folder exists already; pass ``force=True`` to replace it."""


class SourceError(ExportError):
    """The SOURCE to export is missing, of an unknown form, or unreadable."""


class MissingExtra(ExportError):
    """An optional dependency (torch, transformers) that this SOURCE needs is not installed."""


class UnsupportedTask(ExportError):
    """The task cannot be exported as one single-pass ONNX graph."""
