"""The v2 body codec: round trips of every datatype, strict rejection of bad bodies, and fuzzing."""

from __future__ import annotations

import contextlib
import json
import math
import struct
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from runtime.codec import (
    RequestedOutput,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    parse_header_length,
)
from runtime.datatypes import V2_TO_NUMPY
from runtime.errors import CodecError, InvalidRequest, ShapeMismatch, UnsupportedDatatype

# One sample per datatype, with its extremes; BYTES includes empty and non-ASCII strings.
SAMPLES: dict[str, Any] = {
    "BOOL": [True, False, True, True, False, False],
    "UINT8": [0, 1, 127, 128, 254, 255],
    "UINT16": [0, 1, 2**15, 3, 4, 2**16 - 1],
    "UINT32": [0, 1, 2**31, 3, 4, 2**32 - 1],
    "UINT64": [0, 1, 2**63, 3, 2**53 + 1, 2**64 - 1],
    "INT8": [-128, -1, 0, 1, 2, 127],
    "INT16": [-(2**15), -1, 0, 1, 2, 2**15 - 1],
    "INT32": [-(2**31), -1, 0, 1, 2, 2**31 - 1],
    "INT64": [-(2**63), -1, 0, 2**53 + 1, 2, 2**63 - 1],
    "FP16": [0.5, -2.0, 65504.0, 6e-8, -0.0, 1.1],
    "FP32": [1.1, -3.4e38, 1e-45, -0.0, 0.1, 3.0],
    "FP64": [1.1, -1.7976931348623157e308, 5e-324, -0.0, 0.1, 1 / 3],
    "BYTES": [
        b"",
        "h\u00e9llo".encode(),
        b"\x00abc",
        "\u65e5\u672c".encode(),
        b"x",
        "\U0001f600".encode(),
    ],
}
DATATYPES = list(SAMPLES)


def _array(datatype: str, values: list[Any]) -> np.ndarray:
    if datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array
    return np.array(values, dtype=V2_TO_NUMPY[datatype])


def _shaped(datatype: str, kind: str) -> np.ndarray:
    """The sample as a matrix, a zero-size tensor [0, 3] or a scalar-shaped [] tensor."""
    full = _array(datatype, SAMPLES[datatype])
    if kind == "matrix":
        return full.reshape(2, 3)
    if kind == "zero":
        return full[:0].reshape(0, 3)
    return full[1:2].reshape(())


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Exact equality: dtype, shape and (numbers) every bit, (BYTES) every element."""
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object
        assert got.tolist() == want.tolist()
        assert all(type(item) is bytes for item in got.reshape(-1).tolist())
    else:
        assert got.dtype == want.dtype
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()


def _body(doc: dict[str, Any], tail: bytes = b"") -> tuple[bytes, int | None]:
    header = orjson.dumps(doc)
    return header + tail, (len(header) if tail or "binary_data_size" in header.decode() else None)


def _one(datatype: str, shape: list[int], **fields: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, **fields}]}


def _bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["matrix", "zero", "scalar"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_request_round_trip(datatype: str, binary: bool, kind: str) -> None:
    array = _shaped(datatype, kind)
    body, header_length = encode_request({"x": array}, binary_inputs=binary, request_id="r1")
    assert (header_length is not None) == binary
    request = decode_request(body, header_length)
    assert request.id == "r1"
    assert request.datatypes == {"x": datatype}
    assert_same(request.inputs["x"], array)


@pytest.mark.parametrize("kind", ["matrix", "zero", "scalar"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_response_round_trip(datatype: str, binary: bool, kind: str) -> None:
    array = _shaped(datatype, kind)
    body, header_length = encode_response("m", "3", "r1", [("y", array)], [binary])
    assert (header_length is not None) == binary
    response = decode_response(body, header_length)
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "r1")
    assert response.datatypes == {"y": datatype}
    assert_same(response.outputs["y"], array)


def test_non_utf8_bytes_round_trip_in_binary() -> None:
    array = _array("BYTES", [b"\xff\xfe", b"", b"\x80"])
    body, header_length = encode_request({"x": array})
    assert_same(decode_request(body, header_length).inputs["x"], array)
    body, header_length = encode_response("m", None, None, [("y", array)], [True])
    assert_same(decode_response(body, header_length).outputs["y"], array)


def test_mixed_binary_and_json_outputs_keep_order() -> None:
    outputs = [(f"o{i}", _shaped(dt, "matrix")) for i, dt in enumerate(DATATYPES)]
    flags = [i % 2 == 0 for i in range(len(outputs))]
    body, header_length = encode_response("m", None, None, outputs, flags)
    response = decode_response(body, header_length)
    assert list(response.outputs) == [name for name, _ in outputs]
    for name, array in outputs:
        assert_same(response.outputs[name], array)


def test_mixed_binary_and_json_inputs_in_one_request() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    c = np.array([7, 8], dtype=np.int16)
    doc = {
        "inputs": [
            {
                "name": "a",
                "datatype": "FP32",
                "shape": [2, 3],
                "parameters": {"binary_data_size": 24},
            },
            {"name": "b", "datatype": "INT64", "shape": [2], "data": [1, 2]},
            {"name": "c", "datatype": "INT16", "shape": [2], "parameters": {"binary_data_size": 4}},
        ]
    }
    body, header_length = _body(doc, a.tobytes() + c.tobytes())
    request = decode_request(body, header_length)
    assert_same(request.inputs["a"], a)
    assert_same(request.inputs["b"], np.array([1, 2], dtype=np.int64))
    assert_same(request.inputs["c"], c)


def test_binary_inputs_are_zero_copy_views() -> None:
    array = np.arange(1000, dtype=np.float32)
    body, header_length = encode_request({"x": array})
    decoded = decode_request(body, header_length).inputs["x"]
    assert not decoded.flags.writeable
    assert np.shares_memory(decoded, np.frombuffer(body, dtype=np.uint8))


def test_memoryview_and_bytearray_bodies() -> None:
    array = np.arange(4, dtype=np.int32)
    body, header_length = encode_request({"x": array})
    for variant in (bytearray(body), memoryview(body)):
        assert_same(decode_request(variant, header_length).inputs["x"], array)


def test_big_endian_arrays_are_sent_little_endian() -> None:
    array = np.arange(5, dtype=">i4")
    body, header_length = encode_request({"x": array})
    assert header_length is not None
    assert body[header_length:] == np.arange(5, dtype="<i4").tobytes()
    assert_same(decode_request(body, header_length).inputs["x"], np.arange(5, dtype=np.int32))


def test_str_arrays_travel_as_bytes() -> None:
    body, header_length = encode_response(
        "m", None, None, [("s", np.array(["a", "\u00e9"]))], [False]
    )
    response = decode_response(body, header_length)
    assert response.datatypes == {"s": "BYTES"}
    assert response.outputs["s"].tolist() == [b"a", "\u00e9".encode()]


def test_large_float_array_as_json() -> None:
    array = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    body, header_length = encode_response("m", None, None, [("y", array)], [False])
    assert header_length is None
    assert_same(decode_response(body, header_length).outputs["y"], array)


def test_nested_json_data_equals_flat() -> None:
    flat = _one("INT32", [2, 3], data=[1, 2, 3, 4, 5, 6])
    nested = _one("INT32", [2, 3], data=[[1, 2, 3], [4, 5, 6]])
    ragged = _one("INT32", [2, 3], data=[1, [2, [3, 4]], [[5]], 6])
    deep = _one("INT32", [2, 3], data=[[[[1]], [[2]], [[3]]], [[[4]], [[5]], [[6]]]])
    want = np.arange(1, 7, dtype=np.int32).reshape(2, 3)
    for doc in (flat, nested, ragged, deep):
        assert_same(decode_request(orjson.dumps(doc), None).inputs["x"], want)


def test_triton_client_style_request() -> None:
    # What tritonclient.http sends when no outputs are named: binary inputs, binary_data_output.
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    text = _bytes_element(b"hello") + _bytes_element(b"")
    header = orjson.dumps(
        {
            "id": "7",
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [1, 16],
                    "datatype": "INT32",
                    "parameters": {"binary_data_size": 64},
                },
                {
                    "name": "INPUT1",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(text)},
                },
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    body = header + data.tobytes() + text
    request = decode_request(body, parse_header_length(str(len(header)), len(body)))
    assert request.outputs is None
    assert request.wants_binary("OUTPUT0")
    assert_same(request.inputs["INPUT0"], data)
    assert request.inputs["INPUT1"].tolist() == [b"hello", b""]


def test_encode_request_without_outputs_asks_binary_like_triton() -> None:
    body, header_length = encode_request({"x": np.zeros(2, np.float32)})
    doc = orjson.loads(body[:header_length])
    assert "outputs" not in doc
    assert doc["parameters"] == {"binary_data_output": True}
    request = decode_request(body, header_length)
    assert request.wants_binary("anything")


def test_encode_request_with_named_outputs() -> None:
    body, header_length = encode_request(
        {"x": np.zeros(2, np.float32)}, ["a", "b"], binary_inputs=False, binary_outputs=False
    )
    assert header_length is None
    doc = orjson.loads(body)
    assert "parameters" not in doc
    request = decode_request(body, header_length)
    assert request.outputs == [RequestedOutput("a", False), RequestedOutput("b", False)]
    assert not request.wants_binary("a")


def test_wants_binary_per_output_overrides_request_default() -> None:
    doc = _one("FP32", [1], data=[1.0])
    doc["parameters"] = {"binary_data_output": True}
    doc["outputs"] = [{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}]
    request = decode_request(orjson.dumps(doc), None)
    assert request.outputs == [RequestedOutput("a", False), RequestedOutput("b", None)]
    assert not request.wants_binary("a")
    assert request.wants_binary("b")
    assert request.wants_binary("c")


def test_empty_outputs_list_names_no_outputs() -> None:
    doc = _one("FP32", [1], data=[1.0]) | {"outputs": []}
    request = decode_request(orjson.dumps(doc), None)
    assert request.outputs is None
    assert not request.wants_binary("y")


def test_response_omits_absent_fields() -> None:
    body, header_length = encode_response("m", None, None, [("y", np.zeros(1, np.int8))], [False])
    assert header_length is None
    assert set(orjson.loads(body)) == {"model_name", "outputs"}
    body, _ = encode_response("m", "1", "i", [], [], {"k": 1})
    assert orjson.loads(body) == {
        "model_name": "m",
        "model_version": "1",
        "id": "i",
        "parameters": {"k": 1},
        "outputs": [],
    }


def test_binary_response_layout() -> None:
    y = np.array([1.5, 2.5], dtype=np.float32)
    body, header_length = encode_response("m", None, None, [("y", y)], [True])
    assert header_length is not None
    entry = orjson.loads(body[:header_length])["outputs"][0]
    assert entry == {
        "name": "y",
        "datatype": "FP32",
        "shape": [2],
        "parameters": {"binary_data_size": 8},
    }
    assert body[header_length:] == y.astype("<f4").tobytes()


def test_nan_travels_in_binary_but_json_writes_null() -> None:
    y = np.array([np.nan, np.inf, 1.0], dtype=np.float32)
    body, header_length = encode_response("m", None, None, [("y", y)], [True])
    assert_same(decode_response(body, header_length).outputs["y"], y)
    body, header_length = encode_response("m", None, None, [("y", y)], [False])
    assert orjson.loads(body)["outputs"][0]["data"] == [None, None, 1.0]
    with pytest.raises(CodecError, match="binary"):
        decode_response(body, header_length)


def test_non_utf8_bytes_output_as_json_asks_for_binary() -> None:
    with pytest.raises(CodecError, match="binary_data"):
        encode_response("m", None, None, [("y", _array("BYTES", [b"\xff"]))], [False])


def test_encode_response_flag_count_must_match() -> None:
    with pytest.raises(ValueError, match="binary flags"):
        encode_response("m", None, None, [("y", np.zeros(1))], [])


def test_json_fp_values_round_to_nearest() -> None:
    doc = _one("FP16", [3], data=[1, 0.1, 70000])
    got = decode_request(orjson.dumps(doc), None).inputs["x"]
    assert got.tolist() == [1.0, float(np.float16(0.1)), math.inf]


def test_binary_bool_bytes_other_than_one_read_true() -> None:
    body, header_length = _body(
        _one("BOOL", [3], parameters={"binary_data_size": 3}), b"\x00\x02\x01"
    )
    assert decode_request(body, header_length).inputs["x"].tolist() == [False, True, True]


# --- header length -----------------------------------------------------------------------------


def test_header_length_valid() -> None:
    assert parse_header_length(None, 10) is None
    assert parse_header_length("12", 20) == 12
    assert parse_header_length(" 20 ", 20) == 20
    assert parse_header_length("0", 0) == 0


@pytest.mark.parametrize("value", ["abc", "", "1e3", "12.0", "+5", "1_0", "0x10", "\u0661"])
def test_header_length_not_a_number(value: str) -> None:
    with pytest.raises(CodecError, match="not an integer") as info:
        parse_header_length(value, 100)
    assert "Inference-Header-Content-Length" in str(info.value)


def test_header_length_negative() -> None:
    with pytest.raises(CodecError, match="negative"):
        parse_header_length("-5", 100)


@pytest.mark.parametrize("value", ["101", "9" * 5000])
def test_header_length_larger_than_body(value: str) -> None:
    with pytest.raises(CodecError, match="only 100 bytes"):
        parse_header_length(value, 100)


@pytest.mark.parametrize("header_length", [-1, 1000])
def test_decode_request_checks_header_length(header_length: int) -> None:
    with pytest.raises(CodecError, match="Inference-Header-Content-Length"):
        decode_request(orjson.dumps(_one("FP32", [1], data=[1.0])), header_length)


# --- bad requests, one each --------------------------------------------------------------------


def test_malformed_json() -> None:
    with pytest.raises(CodecError, match="not valid JSON"):
        decode_request(b'{"inputs": [', None)


def test_body_is_a_list() -> None:
    with pytest.raises(CodecError, match="must be a JSON object, got a list"):
        decode_request(b"[]", None)


@pytest.mark.parametrize("body", [b"{}", b'{"inputs": []}', b'{"inputs": {}}'])
def test_missing_inputs(body: bytes) -> None:
    with pytest.raises(CodecError, match='needs "inputs": a non-empty list'):
        decode_request(body, None)


def test_wrong_datatype_string() -> None:
    with pytest.raises(UnsupportedDatatype) as info:
        decode_request(orjson.dumps(_one("FLOAT32", [1], data=[1.0])), None)
    assert "FLOAT32" in str(info.value) and "FP32" in str(info.value)


def test_bf16_is_not_supported() -> None:
    with pytest.raises(UnsupportedDatatype, match="BF16 is not supported") as info:
        decode_request(orjson.dumps(_one("BF16", [1], data=[1.0])), None)
    assert "FP32" in str(info.value)


def test_data_length_vs_shape() -> None:
    with pytest.raises(ShapeMismatch) as info:
        decode_request(orjson.dumps(_one("FP32", [2, 3], data=[1.0] * 5)), None)
    assert "5 elements" in str(info.value) and "[2, 3]" in str(info.value)
    assert "needs 6" in str(info.value)


def test_float_into_int64() -> None:
    with pytest.raises(CodecError, match=r"element 1\.5 does not fit INT64.*integers"):
        decode_request(orjson.dumps(_one("INT64", [2], data=[1, 1.5])), None)


def test_bool_into_int32() -> None:
    with pytest.raises(CodecError, match="element true does not fit INT32"):
        decode_request(orjson.dumps(_one("INT32", [2], data=[1, True])), None)


def test_int_into_bool() -> None:
    with pytest.raises(CodecError, match="BOOL, which takes JSON booleans"):
        decode_request(orjson.dumps(_one("BOOL", [2], data=[True, 1])), None)


def test_out_of_range_into_uint8() -> None:
    with pytest.raises(CodecError, match="300 is out of range for UINT8.*from 0 to 255"):
        decode_request(orjson.dumps(_one("UINT8", [2], data=[1, 300])), None)


def test_negative_into_uint64() -> None:
    with pytest.raises(CodecError, match="-1 is out of range for UINT64"):
        decode_request(orjson.dumps(_one("UINT64", [1], data=[-1])), None)


def test_string_into_fp32() -> None:
    with pytest.raises(
        CodecError, match='element "1.0" does not fit FP32, which takes JSON numbers'
    ):
        decode_request(orjson.dumps(_one("FP32", [1], data=["1.0"])), None)


def test_bool_into_fp32() -> None:
    with pytest.raises(CodecError, match="element true does not fit FP32"):
        decode_request(orjson.dumps(_one("FP32", [1], data=[True])), None)


def test_number_into_bytes() -> None:
    with pytest.raises(CodecError, match="BYTES, which takes JSON strings"):
        decode_request(orjson.dumps(_one("BYTES", [1], data=[1])), None)


def test_data_not_a_list() -> None:
    with pytest.raises(CodecError, match='"data" must be a JSON list'):
        decode_request(orjson.dumps(_one("FP32", [], data=1.0)), None)


@pytest.mark.parametrize("shape", [[-1], [1.0], [True], "3", None])
def test_bad_shape(shape: Any) -> None:
    with pytest.raises(CodecError, match='"shape" must be a list of non-negative integers'):
        decode_request(orjson.dumps(_one("FP32", shape, data=[1.0])), None)


def test_binary_sizes_too_few_bytes() -> None:
    body, header_length = _body(_one("FP32", [6], parameters={"binary_data_size": 24}), b"\0" * 20)
    with pytest.raises(CodecError, match="add up to 24 bytes but the body carries 20 after"):
        decode_request(body, header_length)


def test_binary_sizes_too_many_bytes() -> None:
    body, header_length = _body(_one("FP32", [6], parameters={"binary_data_size": 24}), b"\0" * 28)
    with pytest.raises(CodecError, match="add up to 24 bytes but the body carries 28 after"):
        decode_request(body, header_length)


def test_binary_size_not_multiple_of_element_size() -> None:
    body, header_length = _body(_one("FP32", [2], parameters={"binary_data_size": 7}), b"\0" * 7)
    with pytest.raises(ShapeMismatch, match="binary_data_size is 7 bytes .not a multiple of 4"):
        decode_request(body, header_length)


def test_binary_size_disagrees_with_shape() -> None:
    body, header_length = _body(_one("INT64", [3], parameters={"binary_data_size": 16}), b"\0" * 16)
    with pytest.raises(ShapeMismatch, match=r"needs 3 x 8 = 24"):
        decode_request(body, header_length)


def test_bytes_binary_truncated_length_prefix() -> None:
    tail = _bytes_element(b"abc") + b"\x01\x00"
    body, header_length = _body(
        _one("BYTES", [2], parameters={"binary_data_size": len(tail)}), tail
    )
    with pytest.raises(CodecError, match="BYTES element 1 needs a 4-byte length prefix"):
        decode_request(body, header_length)


def test_bytes_binary_length_beyond_size() -> None:
    tail = struct.pack("<I", 50) + b"abc"
    body, header_length = _body(
        _one("BYTES", [1], parameters={"binary_data_size": len(tail)}), tail
    )
    with pytest.raises(CodecError, match="says 50 bytes .* only 3"):
        decode_request(body, header_length)


def test_bytes_binary_leftover_bytes() -> None:
    tail = _bytes_element(b"abc") + b"zz"
    body, header_length = _body(
        _one("BYTES", [1], parameters={"binary_data_size": len(tail)}), tail
    )
    with pytest.raises(CodecError, match="end at byte 7 but binary_data_size is 9"):
        decode_request(body, header_length)


def test_bytes_binary_too_small_for_count() -> None:
    body, header_length = _body(_one("BYTES", [3], parameters={"binary_data_size": 4}), b"\0" * 4)
    with pytest.raises(ShapeMismatch, match="needs 3 BYTES elements"):
        decode_request(body, header_length)


def test_both_data_and_binary_data_size() -> None:
    doc = _one("FP32", [1], data=[1.0], parameters={"binary_data_size": 4})
    body, header_length = _body(doc, b"\0" * 4)
    with pytest.raises(CodecError, match='both "data" and parameters.binary_data_size'):
        decode_request(body, header_length)


def test_neither_data_nor_binary_data_size() -> None:
    with pytest.raises(CodecError, match="carries no tensor"):
        decode_request(orjson.dumps(_one("FP32", [1])), None)


def test_binary_size_without_header_length() -> None:
    doc = _one("FP32", [1], parameters={"binary_data_size": 4})
    with pytest.raises(CodecError, match="no Inference-Header-Content-Length header"):
        decode_request(orjson.dumps(doc), None)
    # With the bytes appended the body is no JSON at all: the message names the missing header.
    with pytest.raises(
        CodecError, match="binary tensors needs the Inference-Header-Content-Length"
    ):
        decode_request(orjson.dumps(doc) + b"\0" * 4, None)


@pytest.mark.parametrize("size", [-4, 4.0, True, "4"])
def test_bad_binary_data_size(size: Any) -> None:
    body, header_length = _body(_one("FP32", [1], parameters={"binary_data_size": size}), b"\0" * 4)
    with pytest.raises(CodecError, match="binary_data_size must be a non-negative integer"):
        decode_request(body, header_length)


def test_duplicate_input_names() -> None:
    entry = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}
    with pytest.raises(CodecError, match='input "x" appears twice'):
        decode_request(orjson.dumps({"inputs": [entry, entry]}), None)


def test_duplicate_output_names() -> None:
    doc = _one("FP32", [1], data=[1.0]) | {"outputs": [{"name": "y"}, {"name": "y"}]}
    with pytest.raises(CodecError, match='output "y" is requested twice'):
        decode_request(orjson.dumps(doc), None)


def test_binary_data_flag_must_be_bool() -> None:
    doc = _one("FP32", [1], data=[1.0]) | {
        "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]
    }
    with pytest.raises(CodecError, match="binary_data must be true or false"):
        decode_request(orjson.dumps(doc), None)


def test_binary_data_output_must_be_bool() -> None:
    doc = _one("FP32", [1], data=[1.0]) | {"parameters": {"binary_data_output": "yes"}}
    with pytest.raises(CodecError, match="binary_data_output must be true or false"):
        decode_request(orjson.dumps(doc), None)


def test_id_must_be_a_string() -> None:
    doc = _one("FP32", [1], data=[1.0]) | {"id": 5}
    with pytest.raises(CodecError, match='"id" must be a string'):
        decode_request(orjson.dumps(doc), None)


def test_huge_shape_with_zero_dim_is_rejected_cleanly() -> None:
    body, header_length = _body(_one("FP32", [0, 2**62, 8], parameters={"binary_data_size": 0}))
    with pytest.raises(ShapeMismatch, match="unusable"):
        decode_request(body, header_length)


def test_too_many_dimensions() -> None:
    with pytest.raises(ShapeMismatch, match="65 dimensions; at most 64"):
        decode_request(orjson.dumps(_one("FP32", [1] * 65, data=[1.0])), None)


def test_huge_dims_give_a_clean_mismatch() -> None:
    doc = _one("UINT8", [2**64 - 1] * 64, data=[1])
    with pytest.raises(ShapeMismatch, match="holds 1 elements"):
        decode_request(orjson.dumps(doc), None)
    doc = _one("UINT8", [2**64 - 1] * 64, parameters={"binary_data_size": 1})
    body, header_length = _body(doc, b"\0")
    with pytest.raises(ShapeMismatch, match="binary_data_size is 1 bytes"):
        decode_request(body, header_length)


def test_response_needs_model_name() -> None:
    with pytest.raises(CodecError, match='"model_name"'):
        decode_response(b'{"outputs": []}', None)


def test_error_messages_do_not_echo_whole_tensors() -> None:
    doc = _one("FP32", [-1, *range(10_000)], data=[1.0, 2.0])
    with pytest.raises(CodecError) as info:
        decode_request(orjson.dumps(doc), None)
    assert len(str(info.value)) < 300


# --- properties --------------------------------------------------------------------------------


# Finite values exactly representable in each float width, so round trips compare bit for bit.
_FINITE = {
    "FP16": st.floats(allow_nan=False, allow_infinity=False, width=16),
    "FP32": st.floats(allow_nan=False, allow_infinity=False, width=32),
    "FP64": st.floats(allow_nan=False, allow_infinity=False, width=64),
}


@st.composite
def tensors(draw: st.DrawFn) -> np.ndarray:
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    if datatype == "BYTES":
        count = math.prod(shape)
        texts = st.text(max_size=6).map(str.encode)
        items = draw(st.lists(texts, min_size=count, max_size=count))
        return _array("BYTES", items).reshape(shape)
    return draw(hnp.arrays(V2_TO_NUMPY[datatype], shape, elements=_FINITE.get(datatype)))


@settings(max_examples=150, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=4), st.booleans(), st.data())
def test_property_round_trip(arrays: list[np.ndarray], binary: bool, data: st.DataObject) -> None:
    named = {f"t{i}": array for i, array in enumerate(arrays)}
    body, header_length = encode_request(named, binary_inputs=binary)
    request = decode_request(body, header_length)
    for name, array in named.items():
        assert_same(request.inputs[name], array)

    flags = data.draw(st.lists(st.booleans(), min_size=len(arrays), max_size=len(arrays)))
    body, header_length = encode_response("m", None, None, list(named.items()), flags)
    response = decode_response(body, header_length)
    for name, array in named.items():
        assert_same(response.outputs[name], array)


_text = st.text(st.characters(codec="utf-8"), max_size=4)
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=10,
)


def _mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``good``, sometimes any JSON value, so fuzzing gets past the first checks."""
    return st.sampled_from(range(8)).flatmap(lambda pick: good if pick else _json_values)


_scalars = st.integers(-300, 300) | st.booleans() | st.floats(-1e3, 1e3) | _text
_entries = st.fixed_dictionaries(
    {
        "name": _mostly(st.sampled_from(["x", "y"])),
        "datatype": _mostly(st.sampled_from([*DATATYPES, "BF16"])),
        "shape": _mostly(st.lists(st.integers(-1, 3), max_size=3)),
    },
    optional={
        "data": _mostly(st.lists(_scalars | st.lists(_scalars, max_size=3), max_size=9)),
        "parameters": _mostly(
            st.fixed_dictionaries({}, optional={"binary_data_size": _mostly(st.integers(-1, 40))})
        ),
    },
)
_documents = st.fixed_dictionaries(
    {"inputs": _mostly(st.lists(_entries, max_size=3))},
    optional={
        "id": _mostly(_text),
        "model_name": _mostly(st.just("m")),
        "parameters": _mostly(
            st.fixed_dictionaries({}, optional={"binary_data_output": _mostly(st.booleans())})
        ),
        "outputs": _mostly(st.lists(_entries, max_size=3)),
    },
)


def _only_invalid_request(body: bytes, header_length: int | None) -> None:
    for decode in (decode_request, decode_response):
        with contextlib.suppress(InvalidRequest):
            decode(body, header_length)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.none() | st.integers(-5, 250))
def test_property_arbitrary_bytes_raise_only_invalid_request(
    body: bytes, header_length: int | None
) -> None:
    _only_invalid_request(body, header_length)


@settings(max_examples=300, deadline=None)
@given(_documents, st.binary(max_size=48), st.booleans(), st.integers(-2, 2))
def test_property_plausible_bodies_raise_only_invalid_request(
    doc: dict[str, Any], tail: bytes, with_header: bool, skew: int
) -> None:
    header = json.dumps(doc).encode()  # stdlib: it writes ints beyond 64 bits, orjson refuses
    if with_header:
        _only_invalid_request(header + tail, len(header) + skew)
    else:
        _only_invalid_request(header, None)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), st.integers(0, 1000))
def test_property_header_length_raises_only_codec_error(value: str, body_length: int) -> None:
    try:
        length = parse_header_length(value, body_length)
    except CodecError:
        return
    assert length is not None and 0 <= length <= body_length


@settings(max_examples=300, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3), st.data())
def test_property_corrupted_valid_bodies_raise_only_invalid_request(
    arrays: list[np.ndarray], data: st.DataObject
) -> None:
    named = {f"t{i}": array for i, array in enumerate(arrays)}
    body, header_length = encode_request(named, binary_inputs=data.draw(st.booleans()))
    start = header_length or 0  # corrupt mostly the binary part, where the JSON stays valid
    corrupted = bytearray(body)
    if start >= len(body) or not data.draw(st.booleans()):
        start = 0
    positions = st.integers(start, len(body) - 1)
    for position in data.draw(st.lists(positions, max_size=4)):
        corrupted[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, 6))
    if cut:
        corrupted = corrupted[:-cut]
    skew = data.draw(st.integers(-2, 2))
    length = None if header_length is None else header_length + skew
    _only_invalid_request(bytes(corrupted), length)


def test_max_elements_is_checked_on_the_declared_shape_before_decoding() -> None:
    from runtime.errors import TooManyElements

    body, length = encode_request({"x": np.ones((2, 3), np.float32)})
    assert decode_request(body, length, max_elements=6).inputs["x"].shape == (2, 3)
    with pytest.raises(TooManyElements, match="6 elements; at most 5"):
        decode_request(body, length, max_elements=5)
    lying = b'{"inputs":[{"name":"x","shape":[4294967296,4294967296],"datatype":"FP32",'
    lying += b'"data":[1]}]}'
    with pytest.raises(TooManyElements, match="at most 100"):
        decode_request(lying, None, max_elements=100)
