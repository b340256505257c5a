"""Open Inference Protocol (KServe v2) tensors: JSON and the binary tensor data extension.

Numpy only; torch conversions live in `tensors.py`. BF16 travels as its raw 16-bit patterns
(uint16) and BYTES as an object array of str/bytes.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any

import numpy as np
import orjson

from kubemaas_runtime.errors import InvalidInput

# v2 datatype -> numpy dtype of the decoded array (little-endian on the wire)
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
    "BYTES": np.dtype(object),
}
# numpy kinds a JSON array may have for each datatype ('b' bool, 'i' int, 'u' uint, 'f' float)
_JSON_KINDS = {"BOOL": "b", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf", "BF16": "iuf"}
_INT_KINDS = "iu"
HEADER_LENGTH = "inference-header-content-length"


@dataclasses.dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclasses.dataclass(slots=True)
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[str] | None  # None: every output
    binary_outputs: dict[str, bool]
    binary_default: bool
    parameters: dict[str, Any]


def _invalid(where: str, what: str) -> InvalidInput:
    return InvalidInput(f"{where}: {what}")


def _parse_shape(where: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _invalid(where, f"'shape' must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def _json_array(where: str, datatype: str, data: Any, count: int) -> np.ndarray:
    if datatype == "BYTES":
        try:
            arr = np.array(data, dtype=object).reshape(-1)
        except ValueError as exc:
            raise _invalid(where, f"'data' is not a regular nested list: {exc}") from None
        for item in arr:
            if not isinstance(item, (str, bytes)):
                raise _invalid(where, f"BYTES data must be strings, got {type(item).__name__}")
        if arr.size != count:
            raise _invalid(where, f"shape holds {count} elements but data has {arr.size}")
        return arr
    try:
        raw = np.asarray(data)
    except ValueError as exc:
        raise _invalid(where, f"'data' is not a regular nested list: {exc}") from None
    kinds = _JSON_KINDS.get(datatype, _INT_KINDS)
    if raw.size and raw.dtype.kind not in kinds:
        expected = {"b": "booleans", "iu": "integers"}.get(kinds, "numbers")
        raise _invalid(where, f"datatype {datatype} expects {expected}, "
                              f"got {_kind_words(raw.dtype.kind)}")
    if raw.size != count:
        raise _invalid(where, f"shape holds {count} elements but data has {raw.size}")
    if datatype == "BF16":
        return _fp32_to_bf16_bits(raw.astype(np.float32).reshape(-1))
    try:
        return raw.astype(NUMPY_DTYPES[datatype], copy=False).reshape(-1)
    except OverflowError as exc:
        raise _invalid(where, f"value out of range for {datatype}: {exc}") from None


def _kind_words(kinds: str) -> str:
    words = {"b": "booleans", "i": "integers", "u": "integers", "f": "non-integer numbers",
             "U": "strings", "S": "strings", "O": "mixed values"}
    return " or ".join(dict.fromkeys(words.get(k, k) for k in kinds))


def _fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    bits = values.astype("<f4").view("<u4")
    # round to nearest even, as torch does
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    return (rounded >> 16).astype("<u2")


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype("<u4") << 16).view("<f4")


def decode_bytes_tensor(where: str, buffer: memoryview, count: int) -> np.ndarray:
    """Length-prefixed (uint32 little-endian) elements, as the binary extension sends BYTES."""
    items = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(buffer):
            raise _invalid(where, f"binary BYTES data ends before element {i} of {count}")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise _invalid(where, f"binary BYTES element {i} overruns the data")
        items[i] = bytes(buffer[offset:offset + length])
        offset += length
    if offset != len(buffer):
        raise _invalid(where, f"binary BYTES data has {len(buffer) - offset} trailing bytes")
    return items


def encode_bytes_tensor(values: np.ndarray) -> bytes:
    parts = []
    for item in values.reshape(-1):
        raw = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _binary_array(where: str, datatype: str, buffer: memoryview, count: int) -> np.ndarray:
    if datatype == "BYTES":
        return decode_bytes_tensor(where, buffer, count)
    dtype = NUMPY_DTYPES[datatype]
    if len(buffer) != count * dtype.itemsize:
        raise _invalid(where, f"binary_data_size {len(buffer)} does not match shape: {count} "
                              f"{datatype} elements need {count * dtype.itemsize} bytes")
    return np.frombuffer(buffer, dtype=dtype)


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Decode a v2 infer request body (JSON, or JSON header + binary tensor data)."""
    if header_length is not None:
        try:
            json_size = int(header_length)
        except ValueError:
            raise InvalidInput("Inference-Header-Content-Length must be an integer") from None
        if not 0 < json_size <= len(body):
            raise InvalidInput(f"Inference-Header-Content-Length {json_size} is outside the "
                               f"body of {len(body)} bytes")
    else:
        json_size = len(body)
    view = memoryview(body)
    try:
        doc = orjson.loads(view[:json_size])
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON request: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request must have a non-empty 'inputs' list")
    offset = json_size
    inputs: list[Tensor] = []
    seen: set[str] = set()
    for index, item in enumerate(raw_inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"inputs[{index}] must be an object with a string 'name'")
        name = item["name"]
        where = f"input '{name}'"
        if name in seen:
            raise _invalid(where, "given more than once")
        seen.add(name)
        datatype = item.get("datatype")
        if datatype not in NUMPY_DTYPES:
            raise _invalid(where, f"unknown datatype {datatype!r}; expected one of "
                                  f"{', '.join(NUMPY_DTYPES)}")
        shape = _parse_shape(where, item.get("shape"))
        count = math.prod(shape)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise _invalid(where, "'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(body):
                raise _invalid(where, f"binary_data_size {size!r} is outside the request body")
            array = _binary_array(where, datatype, view[offset:offset + size], count)
            offset += size
        elif "data" in item:
            array = _json_array(where, datatype, item["data"], count)
        else:
            raise _invalid(where, "has neither 'data' nor a binary_data_size parameter")
        inputs.append(Tensor(name, datatype, shape, array.reshape(shape)))
    if offset != len(body):
        raise InvalidInput(f"request body has {len(body) - offset} bytes beyond its tensors")
    outputs, binary_outputs = _parse_requested_outputs(doc.get("outputs"))
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    request_id = doc.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None,
        inputs=inputs, outputs=outputs, binary_outputs=binary_outputs,
        binary_default=bool(parameters.get("binary_data_output", False)),
        parameters=parameters)


def _parse_requested_outputs(raw: Any) -> tuple[list[str] | None, dict[str, bool]]:
    if raw is None:
        return None, {}
    if not isinstance(raw, list):
        raise InvalidInput("'outputs' must be a list")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"outputs[{index}] must be an object with a string 'name'")
        names.append(item["name"])
        params = item.get("parameters") or {}
        if isinstance(params, dict) and "binary_data" in params:
            binary[item["name"]] = bool(params["binary_data"])
    return names, binary


def encode_infer_response(
    model_name: str, model_version: str | None, request: InferRequest, outputs: list[Tensor],
) -> tuple[bytes, int | None]:
    """Body and JSON header length (None when the body is JSON only)."""
    entries = []
    blobs: list[bytes] = []
    for tensor in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.shape)}
        if request.binary_outputs.get(tensor.name, request.binary_default):
            blob = _tensor_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(tensor)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if model_version is not None:
        doc["model_version"] = model_version
    if request.id is not None:
        doc["id"] = request.id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _tensor_bytes(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return encode_bytes_tensor(tensor.data)
    dtype = NUMPY_DTYPES[tensor.datatype]
    return np.ascontiguousarray(tensor.data, dtype=dtype).tobytes()


def _json_data(tensor: Tensor) -> Any:
    data = tensor.data.reshape(-1)
    if tensor.datatype == "BYTES":
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in data]
    if tensor.datatype == "BF16":
        return np.ascontiguousarray(bf16_bits_to_fp32(data))
    return np.ascontiguousarray(data, dtype=NUMPY_DTYPES[tensor.datatype])


def json_tensor_data(tensor: Tensor) -> Any:
    """The flat JSON `data` of a tensor (BF16 as floats, BYTES as text)."""
    return _json_data(tensor)
