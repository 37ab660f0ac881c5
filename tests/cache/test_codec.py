"""The stored form of cache entries: exact round trips, and damage is always detected."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cache.codec import decode_entry, encode_entry
from cache.errors import CorruptEntry, UnsupportedTensor

NUMERIC = st.sampled_from(["?", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"])
arrays = NUMERIC.flatmap(
    lambda dtype: hnp.arrays(
        np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
    )
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=6), arrays, max_size=4), st.floats(0, 1e12))
def test_round_trip(outputs: dict[str, np.ndarray], expires_at: float) -> None:
    got, expiry = decode_entry(encode_entry(outputs, expires_at))
    assert expiry == expires_at
    assert list(got) == list(outputs)
    for name, array in outputs.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        assert got[name].tobytes() == array.tobytes()  # bit-exact, NaNs included
        assert not got[name].flags.writeable  # a view of the stored value, not a copy


def test_bytes_elements_round_trip() -> None:
    array = np.array([[b"", b"\x00\x01"], ["caf\u00e9", b"x" * 1000]], dtype=object)
    got, _ = decode_entry(encode_entry({"s": array, "fixed": np.array([b"ab", b"c"])}))
    assert got["s"].shape == (2, 2)
    assert got["s"].tolist() == [[b"", b"\x00\x01"], ["caf\u00e9".encode(), b"x" * 1000]]
    assert got["fixed"].tolist() == [b"ab", b"c"]


def test_every_damaged_byte_is_detected() -> None:
    value = encode_entry({"y": np.arange(5, dtype=np.float32), "s": np.array([b"ab"])}, 7.0)
    for position in range(len(value)):
        damaged = bytearray(value)
        damaged[position] ^= 0x01
        with pytest.raises(CorruptEntry):
            decode_entry(bytes(damaged))
    for cut in (0, 3, 10, len(value) - 1):
        with pytest.raises(CorruptEntry):
            decode_entry(value[:cut])


def test_unsupported_tensors_say_what_is_accepted() -> None:
    with pytest.raises(UnsupportedTensor, match="accepted: bool"):
        encode_entry({"c": np.zeros(2, dtype=np.complex128)})
    with pytest.raises(UnsupportedTensor, match="bytes or str"):
        encode_entry({"o": np.array([1, b"x"], dtype=object)})
