"""Decoding tensors: binary views over the body, and JSON data checked per datatype."""

from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np

from runtime.codec.wire import _INT_RANGE, _JSON_TYPES, _LE, _U32, _brief, _dims, _kind, _num, _Spec
from runtime.datatypes import V2_TO_NUMPY
from runtime.errors import CodecError, ShapeMismatch

# ---------------------------------------------------------------------------------------------
# Decoding: the tensors


def _decode_tensors(specs: list[_Spec], tail: memoryview) -> dict[str, np.ndarray]:
    total = sum(spec.size for spec in specs if spec.size is not None)
    if total != len(tail):
        raise CodecError(
            f"binary sizes add up to {total} bytes but the body carries {len(tail)} after the "
            f"header; the binary tensors must fill the body exactly, in header order"
        )
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        if spec.size is None:
            arrays[spec.name] = _from_json(spec)
        else:
            arrays[spec.name] = _from_binary(spec, tail[offset : offset + spec.size])
            offset += spec.size
    return arrays


def _reshape(array: np.ndarray, spec: _Spec) -> np.ndarray:
    try:
        return array.reshape(spec.shape)
    except ValueError as exc:  # over 64 dims, or dims numpy cannot address
        raise ShapeMismatch(f"{spec.where}: shape {_dims(spec.shape)} is unusable: {exc}") from None


def _from_binary(spec: _Spec, buf: memoryview) -> np.ndarray:
    if spec.datatype == "BYTES":
        return _reshape(_bytes_from_binary(buf, spec), spec)
    if spec.datatype == "BOOL":
        raw = np.frombuffer(buf, dtype=np.uint8)
        # numpy assumes bool bytes are 0/1; normalise any other byte (rare) to true.
        flat = raw.view(np.bool_) if raw.size == 0 or raw.max() <= 1 else raw != 0
        return _reshape(flat, spec)
    flat = np.frombuffer(buf, dtype=_LE[spec.datatype])
    if not flat.dtype.isnative:  # big-endian hosts only
        flat = flat.astype(V2_TO_NUMPY[spec.datatype])
    return _reshape(flat, spec)


def _bytes_from_binary(buf: memoryview, spec: _Spec) -> np.ndarray:
    data = bytes(buf)  # one copy; slicing bytes then yields the elements directly
    end = len(data)
    items: list[bytes] = []
    pos = 0
    for index in range(spec.count):
        if end - pos < 4:
            raise CodecError(
                f"{spec.where}: BYTES element {index} needs a 4-byte length prefix at byte {pos} "
                f"but only {end - pos} of binary_data_size {end} remain"
            )
        (length,) = _U32.unpack_from(data, pos)
        pos += 4
        if end - pos < length:
            raise CodecError(
                f"{spec.where}: BYTES element {index} says {length} bytes at byte {pos} but only "
                f"{end - pos} of binary_data_size {end} remain"
            )
        items.append(data[pos : pos + length])
        pos += length
    if pos != end:
        raise CodecError(
            f"{spec.where}: its {spec.count} BYTES elements end at byte {pos} but "
            f"binary_data_size is {end}; the shape and the size must agree"
        )
    return _object_array(items)


def _object_array(items: list[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _flatten(data: list[Any]) -> tuple[list[Any], set[type]]:
    """Row-major elements of flat or nested lists, and the set of their types."""
    flat = data
    while True:
        kinds = set(map(type, flat))
        if list not in kinds:
            return flat, kinds
        # A regular level flattens at C speed; a level mixing lists and scalars walks.
        flat = list(chain.from_iterable(flat)) if kinds == {list} else _flatten_mixed(flat)


def _flatten_mixed(data: list[Any]) -> list[Any]:
    """Flatten lists mixed with scalars at any depth, without recursion (no depth limit)."""
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if type(item) is list:
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _accepted_json(datatype: str) -> str:
    if datatype in _INT_RANGE:
        low, high = _INT_RANGE[datatype]
        return f"JSON integers from {low} to {high}"
    words = {"BOOL": "JSON booleans (true/false)", "BYTES": "JSON strings"}
    return words.get(datatype, "JSON numbers (NaN and Inf cannot travel in JSON: send binary)")


def _from_json(spec: _Spec) -> np.ndarray:
    if not isinstance(spec.data, list):
        raise CodecError(
            f'{spec.where}: "data" must be a JSON list (flat or nested), got {_kind(spec.data)}'
        )
    flat, kinds = _flatten(spec.data)
    if len(flat) != spec.count:
        raise ShapeMismatch(
            f'{spec.where}: "data" holds {len(flat)} elements but shape {_dims(spec.shape)} '
            f"needs {_num(spec.count)}"
        )
    allowed = _JSON_TYPES[spec.datatype]
    if not kinds <= allowed:
        bad = next(item for item in flat if type(item) not in allowed)
        raise CodecError(
            f"{spec.where}: element {_brief(bad)} does not fit {spec.datatype}, which takes "
            f"{_accepted_json(spec.datatype)}"
        )
    if spec.datatype == "BYTES":
        return _reshape(_object_array(_utf8(flat, spec.where)), spec)
    try:
        with np.errstate(over="ignore"):  # float overflow rounds to inf, as IEEE casts do
            flat_array = np.array(flat, dtype=V2_TO_NUMPY[spec.datatype])
    except OverflowError:
        raise CodecError(_out_of_range(flat, spec)) from None
    return _reshape(flat_array, spec)


def _utf8(texts: list[str], where: str) -> list[bytes]:
    try:
        return [text.encode("utf-8") for text in texts]
    except UnicodeEncodeError as exc:
        raise CodecError(f"{where}: a string is not encodable as UTF-8: {exc}") from None


def _out_of_range(flat: list[Any], spec: _Spec) -> str:
    if spec.datatype in _INT_RANGE:
        low, high = _INT_RANGE[spec.datatype]
        bad = next((x for x in flat if not low <= x <= high), None)
    else:  # only a Python int beyond any float gets here; orjson never yields one
        bad = next((x for x in flat if type(x) is int and abs(x) >= 2**1024), None)
    return (
        f"{spec.where}: element {bad} is out of range for {spec.datatype}, which takes "
        f"{_accepted_json(spec.datatype)}"
    )
