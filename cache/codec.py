"""The stored form of a cache entry: named tensors, an expiry time and a checksum.

Layout (little-endian)::

    magic b"OAC" | format 1 (u8) | crc32 of everything after it (u32)
    expires_at (f64, 0 = never) | header length (u32) | pad (u32) | header | tensor bytes ...

The header is JSON, ``[[name, dtype, shape, nbytes], ...]`` padded with blanks to 8 bytes, where
dtype is a numpy dtype string ('<f4') or "BYTES". Each tensor's bytes start 8-aligned; a BYTES
tensor is its element lengths (u32 each) followed by the elements. Decoding is zero copy:
numeric arrays are read-only views of the value.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping

import numpy as np
import orjson

from cache.errors import CorruptEntry, UnsupportedTensor
from cache.tensors import NUMERIC_KINDS, elements, is_bytes, little_endian

_MAGIC = b"OAC\x01"
_CRC = struct.Struct("<I")
_TAIL = struct.Struct("<dII")  # expires_at, header length, pad: what follows magic and crc
_FIXED = 8 + _TAIL.size
_BYTES = "BYTES"
_MAX_ELEMENT = (1 << 32) - 1


def encode_entry(outputs: Mapping[str, np.ndarray], expires_at: float = 0.0) -> bytes:
    """One value holding ``outputs`` (their bytes copied once) and its expiry (0 = never)."""
    header: list[list[object]] = []
    chunks: list[bytes | memoryview] = []
    for name, value in outputs.items():
        array = np.asarray(value)
        if is_bytes(array):
            data = _bytes_chunks(name, array)
            dtype = _BYTES
        else:
            array = little_endian(name, array)
            if not array.flags.c_contiguous:
                array = array.copy(order="C")  # np.ascontiguousarray would make 0-d arrays 1-d
            data = [array.data] if array.size else []  # C-contiguous: joined without a copy
            dtype = array.dtype.str
        nbytes = sum(memoryview(c).nbytes for c in data)
        header.append([name, dtype, list(array.shape), nbytes])
        chunks.extend(data)
        chunks.append(bytes(-nbytes % 8))
    head = orjson.dumps(header)
    head += b" " * (-(_FIXED + len(head)) % 8)  # JSON allows trailing blanks
    tail = _TAIL.pack(expires_at, len(head), 0)
    crc = zlib.crc32(head, zlib.crc32(tail))
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    return b"".join([_MAGIC, _CRC.pack(crc), tail, head, *chunks])


def _bytes_chunks(name: str, array: np.ndarray) -> list[bytes | memoryview]:
    items = elements(name, array)
    lengths = np.fromiter(map(len, items), dtype="<u4", count=len(items))
    if any(len(item) > _MAX_ELEMENT for item in items):
        raise UnsupportedTensor(f"BYTES tensor {name!r} has an element over 4 GiB; accepted: less")
    return [lengths.tobytes(), b"".join(items)]


def decode_entry(value: bytes) -> tuple[dict[str, np.ndarray], float]:
    """The tensors and expiry of a stored value; CorruptEntry if it fails its checksum or form."""
    if len(value) < _FIXED:
        raise CorruptEntry(f"a cache value of {len(value)} bytes is shorter than its header")
    if value[:4] != _MAGIC:
        raise CorruptEntry(f"a cache value starts with {value[:4]!r}; accepted: {_MAGIC!r}")
    (crc,) = _CRC.unpack_from(value, 4)
    if zlib.crc32(memoryview(value)[8:]) != crc:
        raise CorruptEntry("a cache value failed its crc32 checksum")
    expires_at, head_len, _ = _TAIL.unpack_from(value, 8)
    try:
        header = orjson.loads(memoryview(value)[_FIXED : _FIXED + head_len])
        offset = _FIXED + head_len
        outputs: dict[str, np.ndarray] = {}
        for name, dtype, shape, nbytes in header:
            if offset + nbytes > len(value):
                raise CorruptEntry(f"tensor {name!r} runs past the end of its cache value")
            outputs[name] = _decode_tensor(value, offset, dtype, tuple(shape), nbytes)
            offset += nbytes + (-nbytes % 8)
    except CorruptEntry:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise CorruptEntry(f"a cache value's header is malformed: {exc}") from None
    return outputs, expires_at


def _decode_tensor(
    value: bytes, offset: int, dtype: str, shape: tuple[int, ...], nbytes: int
) -> np.ndarray:
    count = math.prod(shape)
    if dtype == _BYTES:
        lengths = np.frombuffer(value, dtype="<u4", count=count, offset=offset)
        if 4 * count + int(lengths.sum(dtype=np.int64)) != nbytes:
            raise CorruptEntry(f"BYTES tensor of shape {shape} does not fill its {nbytes} B")
        ends = offset + 4 * count + np.cumsum(lengths, dtype=np.int64)
        starts = ends - lengths
        items = np.empty(count, dtype=object)
        items[:] = [value[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
        return items.reshape(shape)
    numeric = np.dtype(dtype)
    if numeric.kind not in NUMERIC_KINDS or numeric.itemsize * count != nbytes:
        raise CorruptEntry(f"a cache value holds a {dtype} tensor of shape {shape} in {nbytes} B")
    return np.frombuffer(value, dtype=numeric, count=count, offset=offset).reshape(shape)
