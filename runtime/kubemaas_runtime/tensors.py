"""Conversions between v2 tensors (numpy, see protocol.py) and torch tensors."""

from __future__ import annotations

import numpy as np
import torch

from kubemaas_runtime.protocol import Tensor

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16, "UINT32": torch.uint32,
    "UINT64": torch.uint64, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
V2_DATATYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def v2_datatype(dtype: torch.dtype) -> str:
    try:
        return V2_DATATYPES[dtype]
    except KeyError:
        raise TypeError(f"torch dtype {dtype} has no Open Inference Protocol datatype") from None


def to_torch(array: np.ndarray, datatype: str) -> torch.Tensor:
    """A torch tensor over `array` (no copy when the array is writable and contiguous)."""
    if datatype == "BYTES":
        raise TypeError("BYTES tensors have no torch equivalent")
    if not array.flags.writeable:  # np.frombuffer over the request body
        array = array.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if datatype == "BF16":
        return tensor.view(torch.bfloat16)
    return tensor


def from_torch(name: str, tensor: torch.Tensor) -> Tensor:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    datatype = v2_datatype(tensor.dtype)
    if datatype == "BF16":
        array = tensor.contiguous().view(torch.uint16).numpy()
    else:
        array = tensor.contiguous().numpy()
    return Tensor(name, datatype, tuple(array.shape), array)
