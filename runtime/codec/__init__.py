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

from runtime.codec.api import (
    decode_checked_request,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    parse_header_length,
)
from runtime.codec.wire import HEADER_LENGTH, InferRequest, InferResponse, RequestedOutput

__all__ = [
    "HEADER_LENGTH",
    "InferRequest",
    "InferResponse",
    "RequestedOutput",
    "decode_checked_request",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "parse_header_length",
]
