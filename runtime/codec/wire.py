"""Wire facts of the v2 codec: little-endian dtypes, JSON value types, and the decoded request and
response types."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from runtime.datatypes import V2_TO_NUMPY

HEADER_LENGTH = "Inference-Header-Content-Length"

# Wire dtypes are little-endian whatever the host is.
_LE: dict[str, np.dtype] = {
    name: dtype.newbyteorder("<") for name, dtype in V2_TO_NUMPY.items() if name != "BYTES"
}
_INT_RANGE: dict[str, tuple[int, int]] = {
    name: (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    for name, dtype in V2_TO_NUMPY.items()
    if dtype.kind in "iu"
}
# type() of each JSON element must be in the set: exact types, so a bool is never an int.
_JSON_TYPES: dict[str, frozenset[type]] = {
    "BOOL": frozenset({bool}),
    **{name: frozenset({int}) for name in _INT_RANGE},
    "FP16": frozenset({int, float}),
    "FP32": frozenset({int, float}),
    "FP64": frozenset({int, float}),
    "BYTES": frozenset({str}),
}
_U32 = struct.Struct("<I")
_EMPTY = memoryview(b"")


def _orjson_writes(dtype: np.dtype) -> bool:
    """Whether this orjson serializes arrays of ``dtype`` natively (float16 came late)."""
    try:
        orjson.dumps(np.zeros(1, dtype=dtype), option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        return False
    return True


_ORJSON_NATIVE = frozenset(name for name, dtype in _LE.items() if _orjson_writes(V2_TO_NUMPY[name]))


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None  # the output's own parameters.binary_data if given, else None


@dataclass(slots=True)
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: list[RequestedOutput] | None  # None when the request named no outputs

    def wants_binary(self, output_name: str) -> bool:
        """Per-output ``binary_data``, else request-wide ``binary_data_output``, else False."""
        if self.outputs is not None:
            for output in self.outputs:
                if output.name == output_name and output.binary is not None:
                    return output.binary
        return self.parameters.get("binary_data_output") is True


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str | None
    id: str | None
    parameters: dict[str, Any]
    outputs: dict[str, np.ndarray]
    datatypes: dict[str, str]


@dataclass(slots=True)
class _Spec:
    """One tensor entry of a JSON header, checked but not yet decoded."""

    where: str  # "input 'x'", for messages
    name: str
    datatype: str
    shape: tuple[int, ...]
    count: int
    data: Any  # the JSON data, when not binary
    size: int | None  # binary_data_size, when binary


def _kind(value: object) -> str:
    """A JSON value's kind for messages."""
    if value is None:
        return "null / nothing"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names |= {list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _brief(value: Any) -> str:
    """A parsed JSON value as JSON, cut short so a message never echoes a whole tensor."""
    try:
        text = orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(count: int) -> str:
    return str(count) if count < 10**20 else f"over 10^{len(str(count)) - 1}"


def _dims(shape: tuple[int, ...]) -> str:
    text = str(list(shape))
    return text if len(text) <= 60 else text[:56] + "...]"
