"""A model's signature (names, datatypes, shapes with dynamic dims) and input validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.datatypes import numpy_dtype, v2_datatype, v2_from_ort_type
from runtime.errors import InputMismatch, ShapeMismatch

DYNAMIC = -1


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # DYNAMIC (-1) marks a variable dim

    def describe(self) -> str:
        dims = ",".join("?" if d == DYNAMIC else str(d) for d in self.shape)
        return f"{self.name}: {self.datatype}[{dims}]"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def describe_inputs(self) -> str:
        return "; ".join(spec.describe() for spec in self.inputs)

    @property
    def batchable(self) -> bool:
        """Every input and output has a variable leading dim, so rows can be concatenated."""
        specs = (*self.inputs, *self.outputs)
        return all(len(s.shape) >= 1 and s.shape[0] == DYNAMIC for s in specs)

    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]


def _dim(value: object) -> int:
    # onnxruntime reports a dynamic dim as a str (dim_param) or None.
    return value if isinstance(value, int) and value >= 0 else DYNAMIC


def spec_from_node_arg(arg: Any) -> TensorSpec:
    """A TensorSpec from an onnxruntime NodeArg (``session.get_inputs()`` items)."""
    shape = tuple(_dim(d) for d in (arg.shape or []))
    return TensorSpec(name=arg.name, datatype=v2_from_ort_type(arg.type), shape=shape)


def validate_inputs(signature: Signature, inputs: Mapping[str, np.ndarray]) -> None:
    """Raise a typed error naming the expected signature unless ``inputs`` fit it exactly."""
    expected = {spec.name for spec in signature.inputs}
    unknown = sorted(set(inputs) - expected)
    missing = sorted(expected - set(inputs))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown input(s) {', '.join(unknown)}")
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        raise InputMismatch(f"{'; '.join(parts)}; the model takes {signature.describe_inputs()}")
    for spec in signature.inputs:
        array = inputs[spec.name]
        got = v2_datatype(array.dtype)
        if got != spec.datatype:
            raise InputMismatch(
                f"input {spec.name} has datatype {got}, the model takes {spec.describe()}"
            )
        if array.ndim != len(spec.shape):
            raise ShapeMismatch(
                f"input {spec.name} has shape {list(array.shape)} (rank {array.ndim}), "
                f"the model takes {spec.describe()}"
            )
        for axis, (want, have) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if want != DYNAMIC and want != have:
                raise ShapeMismatch(
                    f"input {spec.name} has {have} at dim {axis}, the model fixes it to {want}: "
                    f"{spec.describe()}"
                )


def validate_output_names(signature: Signature, names: Sequence[str]) -> None:
    known = set(signature.output_names())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InputMismatch(
            f"unknown output(s) {', '.join(unknown)}; the model has "
            f"{', '.join(signature.output_names())}"
        )


def sample_inputs(signature: Signature, batch: int, dynamic_dim: int) -> dict[str, np.ndarray]:
    """Zero-filled warm-up inputs: a variable dim 0 = batch, other variable dims = dynamic_dim."""
    feeds: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        shape = [
            (batch if axis == 0 else dynamic_dim) if d == DYNAMIC else d
            for axis, d in enumerate(spec.shape)
        ]
        if spec.datatype == "BYTES":
            feeds[spec.name] = np.full(shape, b"", dtype=object)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=numpy_dtype(spec.datatype))
    return feeds
