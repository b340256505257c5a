"""Open Inference Protocol (KServe v2) tensors: JSON and the binary tensor data extension.

Numpy only; torch conversions live in `tensors.py`. BF16 travels as its raw 16-bit patterns
(uint16) and BYTES as an object array of str/bytes.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import numpy as np
import orjson

from kubemaas_runtime.errors import InvalidInput, PayloadTooLarge

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
MAX_ID_LENGTH = 256
MAX_REQUESTED_OUTPUTS = 64
PY_OBJECT_OVERHEAD = 56  # a small str or bytes object


@dataclasses.dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclasses.dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one request may declare; every size is checked against these before any buffer is
    made (docs/runtime.md, "Limits and hostile input")."""

    max_tensor_rank: int = 8
    max_tensor_elements: int = 1 << 24
    max_string_bytes: int = 64 * 1024
    max_json_bytes: int = 8 * 1024 * 1024


DEFAULT_LIMITS = RequestLimits()


@dataclasses.dataclass(slots=True)
class InputHeader:
    """One input as its header declares it, before its data is decoded."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    count: int
    json_data: Any = None  # the JSON `data` (a list), or None for binary data
    binary: tuple[int, int] | None = None  # (offset, size) of its bytes in the body


@dataclasses.dataclass(slots=True)
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[str] | None  # None: every output
    binary_outputs: dict[str, bool]
    binary_default: bool
    parameters: dict[str, Any]


@dataclasses.dataclass(slots=True)
class InferHeader:
    """A request whose header is parsed and sized, its tensor data not yet decoded. It has the
    attributes signature checks read (inputs' name, datatype, shape; outputs)."""

    id: str | None
    inputs: list[InputHeader]
    outputs: list[str] | None
    binary_outputs: dict[str, bool]
    binary_default: bool
    parameters: dict[str, Any]
    body: memoryview
    limits: RequestLimits

    def decode(self) -> InferRequest:
        """Decode every input's data (sizes were checked when the header was parsed)."""
        tensors = [Tensor(h.name, h.datatype, h.shape,
                          _decode_input(h, self.body, self.limits).reshape(h.shape))
                   for h in self.inputs]
        return InferRequest(self.id, tensors, self.outputs, self.binary_outputs,
                            self.binary_default, self.parameters)


def _invalid(where: str, what: str) -> InvalidInput:
    return InvalidInput(f"{where}: {what}")


def _parse_shape(where: str, shape: Any, limits: RequestLimits) -> tuple[tuple[int, ...], int]:
    """The shape and its element count, refusing ranks and counts above the limits (checked
    dimension by dimension, so no product is ever formed from unbounded numbers)."""
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _invalid(where, f"'shape' must be a list of non-negative integers, got "
                              f"{_short(shape)}")
    if len(shape) > limits.max_tensor_rank:
        raise _invalid(where, f"shape has {len(shape)} dimensions, more than the limit of "
                              f"{limits.max_tensor_rank} (--max-tensor-rank)")
    count = 1
    for dim in shape:
        if dim > limits.max_tensor_elements:
            raise _invalid(where, f"dimension {dim} exceeds the limit of "
                                  f"{limits.max_tensor_elements} elements (--max-tensor-elements)")
        count *= dim
        if count > limits.max_tensor_elements:
            raise _invalid(where, f"shape {_short(shape)} holds more than the limit of "
                                  f"{limits.max_tensor_elements} elements (--max-tensor-elements)")
    return tuple(shape), count


def _short(value: Any, limit: int = 80) -> str:
    """A bounded rendering of a client's value for an error message (never the whole thing)."""
    try:
        text = repr(value)
    except RecursionError:
        text = "<deeply nested value>"
    return text if len(text) <= limit else text[:limit] + "..."


def _nesting_depth(data: Any, limit: int) -> int:
    """Depth of nested lists along the first elements, counted up to `limit` + 1."""
    depth = 0
    while isinstance(data, list) and depth <= limit:
        depth += 1
        if not data:
            break
        data = data[0]
    return depth


def _json_array(where: str, datatype: str, data: Any, count: int, rank: int,
                limits: RequestLimits) -> np.ndarray:
    if not isinstance(data, list):
        raise _invalid(where, "'data' must be a list")
    if _nesting_depth(data, max(rank, 1)) > max(rank, 1):
        raise _invalid(where, f"'data' is nested deeper than the shape's {rank} dimensions")
    if datatype == "BYTES":
        try:
            arr = np.array(data, dtype=object).reshape(-1)
        except (ValueError, TypeError, RecursionError):
            raise _invalid(where, "'data' is not a regular nested list") from None
        if arr.size != count:
            raise _invalid(where, f"shape holds {count} elements but data has {arr.size}")
        for index, item in enumerate(arr):
            if not isinstance(item, str):
                raise _invalid(where, f"BYTES data must be strings, got "
                                      f"{type(item).__name__} at element {index}")
            _check_string_size(where, index, item, limits)
        return arr
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise _invalid(where, "'data' is not a regular nested list") from None
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


def _check_string_size(where: str, index: int, item: str | bytes, limits: RequestLimits) -> None:
    limit = limits.max_string_bytes
    size = len(item)
    if isinstance(item, str) and size * 4 > limit:  # a character is 1 to 4 UTF-8 bytes
        size = len(item.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise _invalid(where, f"element {index} is {size} bytes, more than the limit of "
                              f"{limit} (--max-string-bytes)")


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


def decode_bytes_tensor(where: str, buffer: memoryview, count: int,
                        limits: RequestLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Length-prefixed (uint32 little-endian) elements, as the binary extension sends BYTES."""
    if count * 4 > len(buffer):  # every element has a 4-byte length: refuse before allocating
        raise _invalid(where, f"binary BYTES data of {len(buffer)} bytes cannot hold {count} "
                              f"elements (each needs at least 4 bytes)")
    items = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(buffer):
            raise _invalid(where, f"binary BYTES data ends before element {i} of {count}")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise _invalid(where, f"binary BYTES element {i} overruns the data")
        if length > limits.max_string_bytes:
            raise _invalid(where, f"element {i} is {length} bytes, more than the limit of "
                                  f"{limits.max_string_bytes} (--max-string-bytes)")
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


def _decode_input(header: InputHeader, body: memoryview, limits: RequestLimits) -> np.ndarray:
    where = f"input '{header.name}'"
    if header.binary is None:
        return _json_array(where, header.datatype, header.json_data, header.count,
                           len(header.shape), limits)
    offset, size = header.binary
    buffer = body[offset:offset + size]
    if header.datatype == "BYTES":
        return decode_bytes_tensor(where, buffer, header.count, limits)
    return np.frombuffer(buffer, dtype=NUMPY_DTYPES[header.datatype])


def parse_infer_header(body: bytes | bytearray, header_length: str | None,
                       limits: RequestLimits = DEFAULT_LIMITS) -> InferHeader:
    """Parse a v2 infer request's JSON (the whole body, or the header before binary tensor
    data) and size every input against `limits` and the bytes present. Decodes no data."""
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
    if json_size > limits.max_json_bytes:
        raise PayloadTooLarge(
            f"the JSON part of the request is {json_size} bytes, more than the limit of "
            f"{limits.max_json_bytes} (--max-json-bytes); send large tensors with the binary "
            f"tensor extension")
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
    inputs: list[InputHeader] = []
    seen: set[str] = set()
    for index, item in enumerate(raw_inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"inputs[{index}] must be an object with a string 'name'")
        name = item["name"]
        where = f"input '{_short(name, 64)[1:-1]}'"
        if name in seen:
            raise _invalid(where, "given more than once")
        seen.add(name)
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in NUMPY_DTYPES:
            raise _invalid(where, f"unknown datatype {_short(datatype, 32)}; expected one of "
                                  f"{', '.join(NUMPY_DTYPES)}")
        shape, count = _parse_shape(where, item.get("shape"), limits)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise _invalid(where, "'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if (not isinstance(size, int) or isinstance(size, bool) or size < 0
                    or offset + size > len(body)):
                raise _invalid(where, f"binary_data_size {_short(size, 32)} is outside the "
                                      f"request body of {len(body)} bytes")
            if datatype != "BYTES" and size != count * NUMPY_DTYPES[datatype].itemsize:
                raise _invalid(where, f"binary_data_size {size} does not match shape: {count} "
                                      f"{datatype} elements need "
                                      f"{count * NUMPY_DTYPES[datatype].itemsize} bytes")
            if datatype == "BYTES" and count * 4 > size:
                raise _invalid(where, f"binary_data_size {size} cannot hold {count} BYTES "
                                      f"elements (each needs at least 4 bytes)")
            inputs.append(InputHeader(name, datatype, shape, count, binary=(offset, size)))
            offset += size
        elif "data" in item:
            inputs.append(InputHeader(name, datatype, shape, count, json_data=item["data"]))
        else:
            raise _invalid(where, "has neither 'data' nor a binary_data_size parameter")
    if offset != len(body):
        raise InvalidInput(f"request body has {len(body) - offset} bytes beyond its tensors")
    outputs, binary_outputs = _parse_requested_outputs(doc.get("outputs"))
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    if request_id is not None and len(request_id) > MAX_ID_LENGTH:
        raise InvalidInput(f"'id' is longer than {MAX_ID_LENGTH} characters")
    return InferHeader(
        id=request_id, inputs=inputs, outputs=outputs, binary_outputs=binary_outputs,
        binary_default=bool(parameters.get("binary_data_output", False)),
        parameters=parameters, body=view, limits=limits)


def decoded_size(header: InputHeader, tensor: Tensor) -> int:
    """Bytes a decoded input holds beyond the request body (binary numeric data is a view of
    the body and holds none); BYTES elements count with Python's per-object overhead."""
    if header.datatype == "BYTES":
        return tensor.data.nbytes + sum(len(x) + PY_OBJECT_OVERHEAD
                                        for x in tensor.data.reshape(-1))
    return 0 if header.binary is not None else tensor.data.nbytes


def parse_infer_request(body: bytes | bytearray, header_length: str | None,
                        limits: RequestLimits = DEFAULT_LIMITS) -> InferRequest:
    """Decode a v2 infer request body (JSON, or JSON header + binary tensor data)."""
    return parse_infer_header(body, header_length, limits).decode()


def _parse_requested_outputs(raw: Any) -> tuple[list[str] | None, dict[str, bool]]:
    if raw is None:
        return None, {}
    if not isinstance(raw, list):
        raise InvalidInput("'outputs' must be a list")
    if len(raw) > MAX_REQUESTED_OUTPUTS:
        raise InvalidInput(f"'outputs' lists {len(raw)} entries, more than the limit of "
                           f"{MAX_REQUESTED_OUTPUTS}")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"outputs[{index}] must be an object with a string 'name'")
        if item["name"] in binary or item["name"] in names:
            raise InvalidInput(f"output '{_short(item['name'], 64)[1:-1]}' is requested "
                               f"more than once")
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
