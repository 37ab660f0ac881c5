"""Encoding tensors: binary (zero copy where possible) or JSON, and assembling the body."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from runtime.codec.wire import _LE, _ORJSON_NATIVE, _U32, _brief
from runtime.datatypes import V2_TO_NUMPY, v2_datatype
from runtime.errors import CodecError, UnsupportedDatatype

# ---------------------------------------------------------------------------------------------
# Encoding


def _encode_tensors(
    items: list[tuple[str, np.ndarray]], binary: list[bool], role: str
) -> tuple[list[dict[str, Any]], list[memoryview | bytes]]:
    """JSON entries and the binary buffers (in entry order) of named arrays."""
    entries: list[dict[str, Any]] = []
    raws: list[memoryview | bytes] = []
    for (name, array), as_binary in zip(items, binary, strict=True):
        where = f"{role} {_brief(name)}"
        datatype = _datatype_of(array, where)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if as_binary:
            raw = _binary_data(array, datatype, where)
            entry["parameters"] = {"binary_data_size": len(raw)}
            raws.append(raw)
        else:
            entry["data"] = _json_data(array, datatype, where, role)
        entries.append(entry)
    return entries, raws


def _datatype_of(array: np.ndarray, where: str) -> str:
    dtype = array.dtype
    if dtype.byteorder not in "=|":
        dtype = dtype.newbyteorder("=")  # a byte-swapped dtype still maps to its datatype
    try:
        return v2_datatype(dtype)
    except UnsupportedDatatype as exc:
        raise UnsupportedDatatype(f"{where}: {exc}") from None


def _binary_data(array: np.ndarray, datatype: str, where: str) -> memoryview | bytes:
    """Little-endian row-major bytes: a byte view of a contiguous array (no copy), or bytes."""
    if datatype != "BYTES":
        flat = np.ascontiguousarray(array, dtype=_LE[datatype]).reshape(-1)
        return flat.data.cast("B") if flat.size else b""  # cast() refuses zero-length views
    parts: list[bytes] = []
    for item in array.reshape(-1).tolist():
        data = _as_bytes(item, where)
        if len(data) > 0xFFFFFFFF:
            raise CodecError(f"{where}: a BYTES element over 4 GiB cannot be framed")
        parts.append(_U32.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _as_bytes(item: Any, where: str) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        try:
            return item.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CodecError(f"{where}: a string is not encodable as UTF-8: {exc}") from None
    raise CodecError(f"{where}: BYTES elements must be bytes or str, got {type(item).__name__}")


def _json_data(array: np.ndarray, datatype: str, where: str, role: str) -> Any:
    if datatype == "BYTES":
        return [_as_text(item, where, role) for item in array.reshape(-1).tolist()]
    flat = np.ascontiguousarray(array, dtype=V2_TO_NUMPY[datatype]).reshape(-1)
    # orjson writes numeric arrays in C (NaN/Inf become null); tolist() only where it cannot.
    return flat if datatype in _ORJSON_NATIVE else flat.tolist()


def _as_text(item: Any, where: str, role: str) -> str:
    if isinstance(item, str):
        return item
    if not isinstance(item, bytes):
        raise CodecError(f"{where}: BYTES elements must be bytes or str, got {type(item).__name__}")
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError:
        ask = "ask for it in binary (parameters.binary_data: true)"
        if role == "input":
            ask = "send it in binary"
        raise CodecError(
            f"{where}: an element is not valid UTF-8, so it cannot travel as a JSON string; {ask}"
        ) from None


def _assemble(doc: dict[str, Any], raws: list[memoryview | bytes]) -> tuple[bytes, int | None]:
    try:
        header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError as exc:
        raise CodecError(f"the body cannot be written as JSON: {exc}") from None
    if not raws:
        return header, None
    return b"".join([header, *raws]), len(header)
