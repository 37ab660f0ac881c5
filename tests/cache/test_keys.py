"""Cache keys: equal requests give equal keys, any difference gives another key."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cache.errors import UnsupportedTensor
from cache.keys import KEY_BYTES, PREFIX_BYTES, cache_key, digest_prefix

DIGEST = "sha256:" + hashlib.sha256(b"model").hexdigest()
OTHER = "sha256:" + hashlib.sha256(b"other").hexdigest()

NUMERIC = st.sampled_from(["?", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"])
arrays = NUMERIC.flatmap(
    lambda dtype: hnp.arrays(
        np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
    )
)
names = st.text(min_size=1, max_size=8)
inputs = st.dictionaries(names, arrays, min_size=1, max_size=3)
outputs = st.none() | st.lists(names, max_size=3)


def test_layout_is_prefix_then_hash() -> None:
    key = cache_key(DIGEST, {"x": np.arange(4, dtype=np.float32)}, None)
    assert len(key) == KEY_BYTES
    assert key[:PREFIX_BYTES] == bytes.fromhex(DIGEST.removeprefix("sha256:"))
    assert key[:PREFIX_BYTES] == digest_prefix(DIGEST)


def test_non_sha256_digests_get_a_fixed_length_prefix() -> None:
    for digest in ("md5:abc", "sha256:XYZ", "", "sha256:" + "a" * 63):
        prefix = digest_prefix(digest)
        assert len(prefix) == PREFIX_BYTES
        assert prefix == digest_prefix(digest)
    assert digest_prefix("md5:abc") != digest_prefix("md5:abd")


def test_prefix_groups_a_digest() -> None:
    rng = np.random.default_rng(0)
    keys = [cache_key(DIGEST, {"x": rng.random(3)}, None) for _ in range(20)]
    keys += [cache_key(OTHER, {"x": rng.random(3)}, None) for _ in range(20)]
    ordered = sorted(keys)
    # all of one digest's keys are adjacent in key order: one LMDB range
    prefixes = [k[:PREFIX_BYTES] for k in ordered]
    assert prefixes == sorted(prefixes)
    assert len(set(prefixes)) == 2


@settings(max_examples=200, deadline=None)
@given(inputs, outputs)
def test_equal_requests_equal_keys(feed: dict[str, np.ndarray], wanted: list[str] | None) -> None:
    copy = {name: np.array(value, copy=True) for name, value in reversed(feed.items())}
    reordered = None if wanted is None else list(reversed(wanted))
    assert cache_key(DIGEST, feed, wanted) == cache_key(DIGEST, copy, reordered)


@settings(max_examples=200, deadline=None)
@given(inputs, outputs, st.data())
def test_any_change_gives_another_key(
    feed: dict[str, np.ndarray], wanted: list[str] | None, data: st.DataObject
) -> None:
    key = cache_key(DIGEST, feed, wanted)
    name = data.draw(st.sampled_from(sorted(feed)))
    array = feed[name]
    changed = dict(feed)
    change = data.draw(st.sampled_from(["dtype", "shape", "byte", "name", "outputs", "digest"]))
    if change == "dtype":
        other = "i1" if array.dtype != np.int8 else "u1"
        with np.errstate(invalid="ignore", over="ignore"):
            changed[name] = array.astype(other)
    elif change == "shape":
        changed[name] = array.reshape((1, *array.shape))
    elif change == "byte":
        if array.nbytes == 0:
            changed[name] = np.zeros(1, dtype=array.dtype)
        else:
            raw = bytearray(np.ascontiguousarray(array).tobytes())
            position = data.draw(st.integers(0, len(raw) - 1))
            raw[position] ^= data.draw(st.integers(1, 255))
            changed[name] = np.frombuffer(bytes(raw), dtype=array.dtype).reshape(array.shape)
    elif change == "name":
        changed[name + "_"] = changed.pop(name)
        if name + "_" in feed:
            return  # renaming onto an existing name is a different test
    elif change == "outputs":
        wanted = [] if wanted is None else (None if not wanted else wanted[:-1])
    else:
        assert cache_key(OTHER, feed, wanted) != key
        return
    assert cache_key(DIGEST, changed, wanted) != key


def test_none_outputs_differ_from_empty_list() -> None:
    feed = {"x": np.zeros(2, np.float32)}
    assert cache_key(DIGEST, feed, None) != cache_key(DIGEST, feed, [])
    assert cache_key(DIGEST, feed, ["a", "b"]) == cache_key(DIGEST, feed, ["b", "a"])


def test_layout_independent_views_hash_alike() -> None:
    base = np.arange(12, dtype=np.int32).reshape(3, 4)
    fortran = np.asfortranarray(base)
    big_endian = base.astype(">i4")
    key = cache_key(DIGEST, {"x": base}, None)
    assert cache_key(DIGEST, {"x": fortran}, None) == key
    assert cache_key(DIGEST, {"x": big_endian}, None) == key
    assert cache_key(DIGEST, {"x": base.T}, None) != key  # other shape and order


def test_bytes_tensors_are_framed() -> None:
    def key(*items: object) -> bytes:
        array = np.empty(len(items), dtype=object)
        array[:] = list(items)
        return cache_key(DIGEST, {"s": array}, None)

    assert key(b"ab", b"c") != key(b"a", b"bc")
    assert key(b"ab", b"c") == key("ab", "c")  # str elements are their UTF-8 bytes
    assert key(b"") != key()
    assert key(b"ab", b"c") == cache_key(DIGEST, {"s": np.array([b"ab", b"c"])}, None)
    with pytest.raises(UnsupportedTensor, match="accepted elements: bytes or str"):
        key(3)


def test_unsupported_dtype_says_what_is_accepted() -> None:
    with pytest.raises(UnsupportedTensor, match="accepted: bool"):
        cache_key(DIGEST, {"c": np.zeros(2, np.complex64)}, None)
