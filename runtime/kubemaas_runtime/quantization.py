"""Quantization applied after loading. This issue implements the casts; the weight-only
methods arrive with the quantization issue and are refused at start until then."""

from __future__ import annotations

import torch

from kubemaas_runtime.errors import ModelLoadFailed

CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
IMPLEMENTED = ("none", "fp16", "bf16", "int8-dynamic")


def quantize_module(module: torch.nn.Module, method: str, device: torch.device
                    ) -> tuple[torch.nn.Module, torch.dtype | None]:
    """The quantized module and the dtype floating inputs must be cast to (None: unchanged)."""
    if method == "none":
        return module, None
    if method in CAST_DTYPES:
        dtype = CAST_DTYPES[method]
        return module.to(dtype), dtype
    if method == "int8-dynamic":
        if device.type != "cpu":
            raise ModelLoadFailed("int8-dynamic quantization runs on CPU only")
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8), None
    raise ModelLoadFailed(f"quantization {method} is not implemented by this runtime yet "
                          f"(implemented: {', '.join(IMPLEMENTED)})")
