"""Which tensors the cache accepts: the v2 protocol's numeric dtypes and BYTES."""

from __future__ import annotations

import sys

import numpy as np

from cache.errors import UnsupportedTensor

NUMERIC_KINDS = frozenset("biuf")  # bool, signed, unsigned, float: what the v2 protocol carries
BYTES_KINDS = frozenset("OSU")  # object arrays of bytes/str, and fixed-width numpy strings
_BIG_ENDIAN = frozenset(">=" if sys.byteorder == "big" else ">")  # "=" is native order
ACCEPTED = "bool, (u)int8-64, float16/32/64 and BYTES (object arrays of bytes or str)"


def is_bytes(array: np.ndarray) -> bool:
    """True for BYTES tensors (object, ``S`` or ``U`` arrays)."""
    return array.dtype.kind in BYTES_KINDS


def little_endian(name: str, array: np.ndarray) -> np.ndarray:
    """A numeric tensor in its little-endian dtype (a copy only if it was big-endian)."""
    if array.dtype.kind not in NUMERIC_KINDS:
        raise UnsupportedTensor(f"tensor {name!r} has dtype {array.dtype}; accepted: {ACCEPTED}")
    if array.dtype.byteorder not in _BIG_ENDIAN:
        return array
    return array.astype(array.dtype.newbyteorder("<"))


def element_bytes(name: str, item: object) -> bytes:
    """One BYTES element as bytes (str is UTF-8), or UnsupportedTensor naming what is accepted."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, bytearray | memoryview):
        return bytes(item)
    raise UnsupportedTensor(
        f"BYTES tensor {name!r} holds a {type(item).__name__}; accepted elements: bytes or str"
    )


def elements(name: str, array: np.ndarray) -> list[bytes]:
    """Every element of a BYTES tensor, in C order, as bytes."""
    return [element_bytes(name, item) for item in array.ravel().tolist()]
