"""The v2 (Open Inference Protocol) body codec: JSON and the binary tensor data extension.

One module for both directions and both sides: the server decodes requests and encodes responses,
clients (benchmarks, tests, node-to-node hops) encode requests and decode responses. Every way a
body can be wrong raises ``CodecError``, ``UnsupportedDatatype`` or ``ShapeMismatch`` (all
``InvalidRequest``) with a message that says what was wrong and what is accepted.

Choices where the protocol is loose:
- Binary tensors decode to read-only ``np.frombuffer`` views over the body (zero copy); they may be
  unaligned (the header length is arbitrary): numpy copes, a consumer that needs alignment copies.
- A binary BYTES tensor is copied once and its elements become ``bytes`` objects.
- A binary BOOL byte other than 0 reads as true (as in C); JSON BOOL takes only true/false.
- JSON FP16/FP32 values round to the nearest representable value (beyond the range: +-inf).
- JSON cannot carry NaN or Inf: orjson writes them as ``null``, and ``null`` never decodes as a
  number (the error says to ask for binary output, which keeps them).
- ``"outputs": []`` names no outputs, like an absent key (``InferRequest.outputs`` is None).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import orjson

from runtime.datatypes import ACCEPTED, V2_TO_NUMPY, v2_datatype
from runtime.errors import CodecError, ShapeMismatch, TooManyElements, UnsupportedDatatype

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


# ---------------------------------------------------------------------------------------------
# Public API


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """The Inference-Header-Content-Length header's value; None means a pure JSON body."""
    if value is None:
        return None
    text = value.strip()
    accepted = f"a non-negative integer no larger than the body ({body_length} bytes)"
    if text[:1] == "-" and text[1:].isascii() and text[1:].isdigit():
        raise CodecError(f"{HEADER_LENGTH} is negative ({value[:40]!r}); it must be {accepted}")
    if not (text.isascii() and text.isdigit()):
        raise CodecError(f"{HEADER_LENGTH} {value[:40]!r} is not an integer; it must be {accepted}")
    # Long digit strings are over any body; skip int() on them (it refuses > 4300 digits).
    length = int(text) if len(text) <= 20 else body_length + 1
    if length > body_length:
        raise CodecError(
            f"{HEADER_LENGTH} is {text[:30]} but the body has only {body_length} bytes; "
            f"it must be {accepted}"
        )
    return length


def decode_request(
    body: bytes | bytearray | memoryview, header_length: int | None, max_elements: int = 0
) -> InferRequest:
    """Decode a v2 inference request body (pure JSON, or a JSON header then binary tensors).

    ``max_elements`` (0: no limit) bounds each input tensor, checked on the declared shape
    before anything is allocated: a body of a few bytes cannot ask for a huge array.
    """
    header, tail = _split(body, header_length)
    doc = _load_object(header, "request", header_length is None)
    entries = doc.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise CodecError(
            f'the request needs "inputs": a non-empty list of tensors, got {_kind(entries)}'
        )
    request_id = _optional_str(doc, "id", "request")
    parameters = _parameters(doc, "request")
    outputs = _requested_outputs(doc.get("outputs"))
    specs = _specs(entries, "input", header_length is not None)
    if max_elements:
        for spec in specs:
            if spec.count > max_elements:
                raise TooManyElements(
                    f"{spec.where}: shape {_dims(spec.shape)} has {_num(spec.count)} elements; "
                    f"at most {max_elements:,} per tensor are accepted (max_tensor_elements)"
                )
    return InferRequest(
        id=request_id,
        parameters=parameters,
        inputs=_decode_tensors(specs, tail),
        datatypes={spec.name: spec.datatype for spec in specs},
        outputs=outputs,
    )


def decode_response(
    body: bytes | bytearray | memoryview, header_length: int | None
) -> InferResponse:
    """Decode a v2 inference response body; as strict as ``decode_request``."""
    header, tail = _split(body, header_length)
    doc = _load_object(header, "response", header_length is None)
    model_name = doc.get("model_name")
    if not isinstance(model_name, str):
        raise CodecError(f'the response needs "model_name": a string, got {_kind(model_name)}')
    entries = doc.get("outputs")
    if not isinstance(entries, list):
        raise CodecError(f'the response needs "outputs": a list of tensors, got {_kind(entries)}')
    model_version = _optional_str(doc, "model_version", "response")
    response_id = _optional_str(doc, "id", "response")
    parameters = _parameters(doc, "response")
    specs = _specs(entries, "output", header_length is not None)
    return InferResponse(
        model_name=model_name,
        model_version=model_version,
        id=response_id,
        parameters=parameters,
        outputs=_decode_tensors(specs, tail),
        datatypes={spec.name: spec.datatype for spec in specs},
    )


def encode_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: list[tuple[str, np.ndarray]],
    binary: list[bool],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Build a response body; header_length is None when no output is binary (pure JSON)."""
    if len(binary) != len(outputs):
        # A caller bug, not a client error: let it surface as a 500.
        raise ValueError(f"{len(outputs)} outputs but {len(binary)} binary flags")
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    entries, raws = _encode_tensors(outputs, binary, "output")
    doc["outputs"] = entries
    return _assemble(doc, raws)


def encode_request(
    inputs: dict[str, np.ndarray],
    outputs: list[str] | None = None,
    *,
    binary_inputs: bool = True,
    binary_outputs: bool = True,
    request_id: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Build a request body the way Triton's HTTP client does (client side)."""
    params: dict[str, Any] = {}
    if outputs is None and binary_outputs:
        params["binary_data_output"] = True  # Triton's client: no outputs named -> all binary
    params.update(parameters or {})
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    if params:
        doc["parameters"] = params
    items = [(name, np.asarray(array)) for name, array in inputs.items()]
    entries, raws = _encode_tensors(items, [binary_inputs] * len(items), "input")
    doc["inputs"] = entries
    if outputs is not None:
        doc["outputs"] = [
            {"name": name, "parameters": {"binary_data": binary_outputs}} for name in outputs
        ]
    return _assemble(doc, raws)


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


def _kind(value: object) -> str:
    """A JSON value's kind for messages."""
    if value is None:
        return "null / nothing"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names |= {list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


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


def _num(count: int) -> str:
    return str(count) if count < 10**20 else f"over 10^{len(str(count)) - 1}"


def _dims(shape: tuple[int, ...]) -> str:
    text = str(list(shape))
    return text if len(text) <= 60 else text[:56] + "...]"


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


def _brief(value: Any) -> str:
    """A parsed JSON value as JSON, cut short so a message never echoes a whole tensor."""
    try:
        text = orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
