"""Decoding the JSON header: the request or response object and each tensor entry, checked."""

from __future__ import annotations

import math
from typing import Any

import orjson

from runtime.codec.wire import (
    _EMPTY,
    _LE,
    HEADER_LENGTH,
    RequestedOutput,
    _brief,
    _dims,
    _kind,
    _num,
    _Spec,
)
from runtime.datatypes import ACCEPTED, V2_TO_NUMPY
from runtime.errors import CodecError, ShapeMismatch, UnsupportedDatatype

# ---------------------------------------------------------------------------------------------
# Decoding: the JSON header


def _split(
    body: bytes | bytearray | memoryview, header_length: int | None
) -> tuple[memoryview, memoryview]:
    """The JSON header and the binary tail, as views over the body."""
    try:
        view = memoryview(body).cast("B")
    except TypeError as exc:
        raise CodecError(f"the body must be contiguous bytes: {exc}") from None
    if header_length is None:
        return view, _EMPTY
    valid = isinstance(header_length, int) and not isinstance(header_length, bool)
    if not valid or not 0 <= header_length <= len(view):
        raise CodecError(
            f"{HEADER_LENGTH} is {header_length!r}; it must be an integer from 0 to the body "
            f"length ({len(view)} bytes)"
        )
    return view[:header_length], view[header_length:]


def _load_object(header: memoryview, what: str, pure_json: bool) -> dict[str, Any]:
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        # The usual cause of trailing bytes: binary tensors sent without the length header.
        hint = (
            f" (a body with binary tensors needs the {HEADER_LENGTH} header)" if pure_json else ""
        )
        raise CodecError(f"the {what} is not valid JSON: {exc}{hint}") from None
    if not isinstance(doc, dict):
        raise CodecError(f"the {what} must be a JSON object, got {_kind(doc)}")
    return doc


def _optional_str(doc: dict[str, Any], key: str, what: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise CodecError(f'the {what}\'s "{key}" must be a string, got {_kind(value)}')
    return value


def _parameters(doc: dict[str, Any], what: str) -> dict[str, Any]:
    params = doc.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise CodecError(f'the {what}\'s "parameters" must be an object, got {_kind(params)}')
    flag = params.get("binary_data_output")
    if flag is not None and not isinstance(flag, bool):
        raise CodecError(f"parameters.binary_data_output must be true or false, got {_brief(flag)}")
    return params


def _requested_outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise CodecError(f'"outputs" must be a list of {{"name": ...}} objects, got {_kind(value)}')
    requested: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, entry in enumerate(value):
        where = f"outputs[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise CodecError(f'{where} must be an object with a string "name", got {_brief(entry)}')
        name = entry["name"]
        if name in seen:
            raise CodecError(f"output {_brief(name)} is requested twice; name each output once")
        seen.add(name)
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise CodecError(
                f'output {_brief(name)}: "parameters" must be an object, got {_brief(params)}'
            )
        flag = params.get("binary_data")
        if flag is not None and not isinstance(flag, bool):
            raise CodecError(
                f"output {_brief(name)}: parameters.binary_data must be true or false, "
                f"got {_brief(flag)}"
            )
        requested.append(RequestedOutput(name, flag))
    return requested or None


def _specs(entries: list[Any], role: str, binary_allowed: bool) -> list[_Spec]:
    specs = [_spec(entry, index, role, binary_allowed) for index, entry in enumerate(entries)]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise CodecError(
                f"{role} {_brief(spec.name)} appears twice; each {role} name must be unique"
            )
        seen.add(spec.name)
    return specs


def _spec(entry: Any, index: int, role: str, binary_allowed: bool) -> _Spec:
    if not isinstance(entry, dict):
        raise CodecError(f"{role}s[{index}] must be an object, got {_kind(entry)}")
    name = entry.get("name")
    if not isinstance(name, str):
        raise CodecError(f'{role}s[{index}] needs "name": a string, got {_kind(name)}')
    where = f"{role} {_brief(name)}"
    datatype = _datatype(entry.get("datatype"), where)
    shape = _shape(entry.get("shape"), where)
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise CodecError(f'{where}: "parameters" must be an object, got {_kind(params)}')
    size = params.get("binary_data_size")
    has_data = entry.get("data") is not None
    spec = _Spec(where, name, datatype, shape, math.prod(shape), entry.get("data"), None)
    if size is None:
        if not has_data:
            hint = " (shared memory is not supported)" if "shared_memory_region" in params else ""
            raise CodecError(
                f'{where} carries no tensor: give "data" or parameters.binary_data_size{hint}'
            )
        return spec
    if has_data:
        raise CodecError(
            f'{where} has both "data" and parameters.binary_data_size; give one of them'
        )
    if type(size) is not int or size < 0:
        raise CodecError(
            f"{where}: parameters.binary_data_size must be a non-negative integer, "
            f"got {_brief(size)}"
        )
    if not binary_allowed:
        raise CodecError(
            f"{where} has parameters.binary_data_size but there is no {HEADER_LENGTH} header, "
            "so the body is pure JSON; send the header with the JSON part's length"
        )
    _check_binary_size(spec, size)
    spec.size = size
    return spec


def _datatype(value: Any, where: str) -> str:
    if value == "BF16":
        raise UnsupportedDatatype(
            f"{where}: BF16 is not supported (numpy has no bfloat16); send FP32 or FP16 instead"
        )
    if not isinstance(value, str) or value not in V2_TO_NUMPY:
        raise UnsupportedDatatype(
            f"{where}: datatype {_brief(value)} is not supported; accepted: {ACCEPTED}"
        )
    return value


_MAX_DIMS = 64  # numpy's limit; it also keeps prod(shape) printable (str() caps int digits)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise CodecError(
            f'{where}: "shape" must be a list of non-negative integers, got {_brief(value)}'
        )
    if len(value) > _MAX_DIMS:
        raise ShapeMismatch(
            f"{where}: shape has {len(value)} dimensions; at most {_MAX_DIMS} are supported"
        )
    return tuple(value)


def _check_binary_size(spec: _Spec, size: int) -> None:
    if spec.datatype == "BYTES":
        # Each element needs at least its 4-byte length prefix.
        if spec.count * 4 > size:
            raise ShapeMismatch(
                f"{spec.where}: shape {_dims(spec.shape)} needs {_num(spec.count)} BYTES "
                f"elements, at least {_num(spec.count * 4)} bytes of length prefixes, but "
                f"binary_data_size is {size}"
            )
        return
    itemsize = _LE[spec.datatype].itemsize
    expected = spec.count * itemsize
    if size != expected:
        why = f"not a multiple of {itemsize}, " if size % itemsize else ""
        raise ShapeMismatch(
            f"{spec.where}: binary_data_size is {size} bytes ({why}the {spec.datatype} element "
            f"size) but shape {_dims(spec.shape)} needs {_num(spec.count)} x {itemsize} = "
            f"{_num(expected)}"
        )
