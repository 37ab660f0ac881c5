"""The v2 protocol's datatypes and their numpy / onnxruntime counterparts."""

from __future__ import annotations

import numpy as np

from runtime.errors import UnsupportedDatatype

# v2 datatype -> numpy dtype. BYTES is an object array of ``bytes``; BF16 has no numpy dtype.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

ACCEPTED = ", ".join(V2_TO_NUMPY)

# onnxruntime's NodeArg.type strings -> v2 datatype.
_ORT_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}

# v2 datatype -> Triton model-config type names (for GET .../config).
V2_TO_TRITON_CONFIG: dict[str, str] = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
    "BF16": "TYPE_BF16",
}


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a v2 datatype, or UnsupportedDatatype naming the accepted ones."""
    try:
        return V2_TO_NUMPY[datatype]
    except (KeyError, TypeError):
        raise UnsupportedDatatype(
            f"datatype {datatype!r} is not supported; accepted: {ACCEPTED}"
        ) from None


def v2_datatype(dtype: np.dtype) -> str:
    """The v2 datatype of a numpy dtype (object and bytes/str arrays are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    for name, candidate in V2_TO_NUMPY.items():
        if candidate == dtype:
            return name
    raise UnsupportedDatatype(f"numpy dtype {dtype} has no v2 datatype; accepted: {ACCEPTED}")


def v2_from_ort_type(ort_type: str) -> str:
    """The v2 datatype of an onnxruntime NodeArg type such as ``tensor(float)``."""
    try:
        return _ORT_TO_V2[ort_type]
    except KeyError:
        raise UnsupportedDatatype(
            f"onnxruntime type {ort_type!r} cannot be served over the v2 protocol"
        ) from None


def element_size(datatype: str) -> int:
    """Bytes per element of a fixed-size v2 datatype (BYTES has none)."""
    if datatype == "BYTES":
        raise UnsupportedDatatype("BYTES elements have no fixed size")
    return numpy_dtype(datatype).itemsize
