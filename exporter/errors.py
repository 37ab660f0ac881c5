"""Typed errors of the exporter package (DESIGN.md "Conventions": one errors.py per package)."""

from __future__ import annotations


class ExportError(Exception):
    """Base of every error raised by ``exporter``: the model or package could not be produced."""


class PackageExists(ExportError):
    """The package version folder exists already; pass ``force=True`` to replace it."""
