"""The codec's public functions: decode and encode requests and responses."""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.codec.encode import _assemble, _encode_tensors
from runtime.codec.header import (
    _load_object,
    _optional_str,
    _parameters,
    _requested_outputs,
    _specs,
    _split,
)
from runtime.codec.tensors import _decode_tensors
from runtime.codec.wire import HEADER_LENGTH, InferRequest, InferResponse, _dims, _kind, _num
from runtime.errors import CodecError, TooManyElements
from runtime.signature import Signature, validate_inputs, validate_output_names

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


def decode_checked_request(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    signature: Signature,
    max_elements: int = 0,
) -> InferRequest:
    """``decode_request``, then the inputs and any requested outputs checked against the
    model's signature: what every server does with a request before it runs anything."""
    request = decode_request(body, header_length, max_elements)
    validate_inputs(signature, request.inputs)
    if request.outputs:
        validate_output_names(signature, [o.name for o in request.outputs])
    return request


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
