"""Typed errors of the exporter package (one errors.py per package, as every package has)."""

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


class UnsupportedArchitecture(SourceError):
    """The model is not of an architecture the generation exporter writes graphs for."""


class DecoderVerificationFailed(ExportError):
    """The chained decoder segments do not match PyTorch; the message lists every failure."""

    def __init__(self, what: str, failures: list[str]) -> None:
        shown = "; ".join(failures[:12]) + ("; ..." if len(failures) > 12 else "")
        super().__init__(f"{what}: {len(failures)} failure(s): {shown}")
        self.failures = failures


class QuantizationRejected(ExportError):
    """Quantised segments lose more accuracy than allowed; pass force=True to write them anyway."""


class PartitionError(ExportError):
    """The graph cannot be cut as asked (a cycle, an untyped frontier tensor, bad grouping)."""


class VerificationFailed(ExportError):
    """Some outputs differ beyond tolerance; the message lists each with its max difference."""

    def __init__(self, what: str, failures: dict[str, float], atol: float, rtol: float) -> None:
        listing = "; ".join(f"{name}: max abs diff {diff:.3g}" for name, diff in failures.items())
        super().__init__(
            f"{what}: {len(failures)} output(s) differ beyond atol={atol:g}, rtol={rtol:g}: "
            f"{listing}"
        )
        self.failures = failures


class ReducedPrecisionRejected(ExportError):
    """int8 or fp16 segments differ from fp32 beyond the reduced-precision tolerance."""
