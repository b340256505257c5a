"""The v2 codec alone: JSON and binary tensors, every datatype, and its error messages."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest
from kubemaas_runtime.errors import InvalidInput
from kubemaas_runtime.protocol import (
    Tensor,
    bf16_bits_to_fp32,
    encode_bytes_tensor,
    encode_infer_response,
    parse_infer_request,
)


def request(*inputs, **extra) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **extra})


def test_json_numeric_datatypes():
    for datatype, dtype in [("FP32", np.float32), ("FP16", np.float16), ("INT64", np.int64),
                            ("INT8", np.int8), ("UINT8", np.uint8), ("FP64", np.float64)]:
        parsed = parse_infer_request(request(
            {"name": "x", "datatype": datatype, "shape": [2, 2], "data": [1, 2, 3, 4]}), None)
        tensor = parsed.inputs[0]
        assert tensor.data.dtype == dtype and tensor.data.shape == (2, 2)
        assert tensor.data.tolist() == [[1, 2], [3, 4]]


def test_json_nested_data_bool_and_bytes():
    parsed = parse_infer_request(request(
        {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
        {"name": "s", "datatype": "BYTES", "shape": [1, 2], "data": [["a", "héllo"]]},
        {"name": "n", "datatype": "FP32", "shape": [2, 1], "data": [[1.5], [2.5]]},
        id="abc"), None)
    b, s, n = parsed.inputs
    assert b.data.tolist() == [True, False]
    assert s.data.tolist() == [["a", "héllo"]]
    assert n.data.tolist() == [[1.5], [2.5]]
    assert parsed.id == "abc"


def test_bf16_json_round_trips_through_bits():
    parsed = parse_infer_request(request(
        {"name": "x", "datatype": "BF16", "shape": [3], "data": [1.0, -2.5, 0.15625]}), None)
    bits = parsed.inputs[0].data
    assert bits.dtype == np.uint16
    assert bf16_bits_to_fp32(bits).tolist() == [1.0, -2.5, 0.15625]


def test_binary_inputs_follow_the_json_header():
    floats = np.arange(6, dtype="<f4")
    strings = encode_bytes_tensor(np.array([b"ab", b"", "ç"], dtype=object))
    header = orjson.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3],
         "parameters": {"binary_data_size": floats.nbytes}},
        {"name": "s", "datatype": "BYTES", "shape": [3],
         "parameters": {"binary_data_size": len(strings)}}]})
    parsed = parse_infer_request(header + floats.tobytes() + strings, str(len(header)))
    x, s = parsed.inputs
    assert x.data.tolist() == floats.reshape(2, 3).tolist()
    assert s.data.tolist() == [b"ab", b"", "ç".encode()]


@pytest.mark.parametrize("body, header, message", [
    (b"{not json", None, "malformed JSON"),
    (b"[]", None, "JSON object"),
    (request(), None, "non-empty 'inputs'"),
    (request({"datatype": "FP32", "shape": [1], "data": [1]}), None, "string 'name'"),
    (request({"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}), None,
     "input 'x': unknown datatype 'FLOAT'"),
    (request({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}), None,
     "input 'x': shape holds 4 elements but data has 3"),
    (request({"name": "x", "datatype": "FP32", "shape": [2], "data": ["a", "b"]}), None,
     "input 'x': datatype FP32 expects numbers, got strings"),
    (request({"name": "x", "datatype": "INT64", "shape": [2], "data": [1.5, 2]}), None,
     "input 'x': datatype INT64 expects integers, got non-integer numbers"),
    (request({"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}), None,
     "non-negative integers"),
    (request({"name": "x", "datatype": "FP32", "shape": [1]}), None, "neither 'data'"),
    (request({"name": "x", "datatype": "BYTES", "shape": [1], "data": [3]}), None,
     "BYTES data must be strings"),
    (request({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1], [2, 3]]}), None,
     "regular nested list"),
    (request({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
             {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}), None,
     "more than once"),
    (request({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}), "9999",
     "Inference-Header-Content-Length"),
])
def test_malformed_requests_name_the_problem(body, header, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_infer_request(body, header)


def test_binary_size_must_match_shape():
    header = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3],
                                       "parameters": {"binary_data_size": 8}}]})
    with pytest.raises(InvalidInput, match="input 'x': binary_data_size 8 does not match"):
        parse_infer_request(header + b"\0" * 8, str(len(header)))


def test_truncated_binary_bytes():
    blob = struct.pack("<I", 10) + b"abc"
    header = orjson.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1],
                                       "parameters": {"binary_data_size": len(blob)}}]})
    with pytest.raises(InvalidInput, match="overruns"):
        parse_infer_request(header + blob, str(len(header)))


def test_response_json_and_binary_outputs():
    req = parse_infer_request(request(
        {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
        id="r-7", outputs=[{"name": "a", "parameters": {"binary_data": True}}, {"name": "b"}]),
        None)
    outputs = [Tensor("a", "FP32", (2,), np.array([1.0, 2.0], dtype=np.float32)),
               Tensor("b", "BYTES", (1,), np.array([b"yes"], dtype=object))]
    body, header_length = encode_infer_response("m", "1", req, outputs)
    doc = orjson.loads(body[:header_length])
    assert doc["id"] == "r-7" and doc["model_name"] == "m"
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert doc["outputs"][1]["data"] == ["yes"]
    assert np.frombuffer(body[header_length:], dtype="<f4").tolist() == [1.0, 2.0]
    json_only, none = encode_infer_response("m", "1", parse_infer_request(request(
        {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}), None), outputs)
    assert none is None and orjson.loads(json_only)["outputs"][0]["data"] == [1.0, 2.0]
