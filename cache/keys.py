"""Result-cache keys: a fixed-length model-digest prefix and a hash of the request.

Layout: ``digest_prefix(digest)`` (32 bytes) + blake2b-128 over a canonical, length-prefixed
encoding of the requested outputs and every input. The prefix keeps one model version's entries
in one LMDB key range, so dropping a version is a range delete.
"""

from __future__ import annotations

import functools
import hashlib
import string
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from cache.tensors import elements, is_bytes, little_endian

PREFIX_BYTES = 32
HASH_BYTES = 16
KEY_BYTES = PREFIX_BYTES + HASH_BYTES

_SHA256 = "sha256:"
_HEX = frozenset(string.hexdigits)
_BYTES_DTYPE = b"\x05BYTES"  # length-prefixed like the numeric dtype strings
_U64 = struct.Struct("<Q")
_ALL_OUTPUTS = b"\x00"  # None (every output) must differ from an empty list
_SOME_OUTPUTS = b"\x01"


@functools.lru_cache(maxsize=1024)  # a handful of digests, looked up on every request
def digest_prefix(digest: str) -> bytes:
    """The 32-byte key prefix of a model digest.

    A ``sha256:<64 hex>`` digest gives its own raw bytes; anything else is hashed to 32 bytes
    (personalised blake2b, so it is no cheaper to collide with a sha256 prefix than sha256).
    """
    if digest.startswith(_SHA256):
        hexpart = digest[len(_SHA256) :]
        if len(hexpart) == 64 and _HEX.issuperset(hexpart):
            return bytes.fromhex(hexpart)
    return hashlib.blake2b(digest.encode(), digest_size=PREFIX_BYTES, person=b"oa-digest").digest()


def cache_key(
    digest: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
) -> bytes:
    """The cache key of running model ``digest`` on ``inputs`` and returning ``outputs``.

    ``outputs=None`` means every output, and is a different key from an empty list. Inputs are
    hashed in name order, each with its dtype (little-endian), shape and C-order bytes;
    contiguous arrays are hashed in place, without a copy.
    """
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    if outputs is None:
        h.update(_ALL_OUTPUTS)
    else:
        names = sorted(outputs)
        h.update(_SOME_OUTPUTS + _U64.pack(len(names)))
        for name in names:
            _update_str(h, name)
    h.update(_U64.pack(len(inputs)))
    for name in sorted(inputs):
        _update_str(h, name)
        _update_array(h, name, np.asarray(inputs[name]))
    return digest_prefix(digest) + h.digest()


def _update_str(h: hashlib.blake2b, text: str) -> None:
    raw = text.encode()
    h.update(_U64.pack(len(raw)) + raw)


def _update_array(h: hashlib.blake2b, name: str, array: np.ndarray) -> None:
    shape = struct.pack(f"<Q{array.ndim}q", array.ndim, *array.shape)
    if is_bytes(array):
        items = elements(name, array)
        lengths = np.fromiter(map(len, items), dtype="<u8", count=len(items))
        h.update(_BYTES_DTYPE + shape + lengths.tobytes())
        h.update(b"".join(items))
        return
    array = little_endian(name, array)
    dtype = array.dtype.str.encode()
    h.update(bytes((len(dtype),)) + dtype + shape)
    if array.size:
        h.update(np.ascontiguousarray(array).data)  # a view when already C-contiguous
