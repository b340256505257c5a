"""Quantization applied after loading, and the device x method matrix it follows.

Every method either applies for real or raises `QuantizationUnsupported`: a variant never
serves full precision under a quantized name. `QuantizationResult.backend` says what ran.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from kubemaas_runtime.errors import QuantizationUnsupported

log = logging.getLogger("kubemaas_runtime")

# The published matrix (docs/quantization.md; the operator's api/constants.py
# QUANTIZATION_DEVICES says the same). On CPU, fp16/bf16 also need native hardware support,
# checked at start (`cpu_half_support`).
QUANTIZATION_DEVICES: dict[str, frozenset[str]] = {
    "none": frozenset({"cpu", "gpu"}),
    "fp16": frozenset({"cpu", "gpu"}),
    "bf16": frozenset({"cpu", "gpu"}),
    "int8-dynamic": frozenset({"cpu"}),
    "int8-weight-only": frozenset({"cpu", "gpu"}),
    "int4-weight-only": frozenset({"cpu", "gpu"}),
}
CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# CPU flags (/proc/cpuinfo) that give native arithmetic in each half type.
NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
INT4_GROUP_SIZE = 32
# FFN output projections (BERT-style `layer.N.output.dense`) are the most sensitive layers to
# int8 activations: int8-dynamic keeps them in full precision (docs/quantization.md).
DYNAMIC_KEEP_SUFFIXES = ("output.dense",)
DYNAMIC_KEEP_EXCEPT = ("attention.",)


@dataclasses.dataclass(frozen=True)
class QuantizationResult:
    module: torch.nn.Module
    input_dtype: torch.dtype | None  # floating inputs are cast to it (None: unchanged)
    backend: str  # what ran, e.g. "torchao Int8WeightOnlyConfig (per-row)"


def device_class(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_half_support(method: str) -> str | None:
    """The CPU feature that computes `method` natively, or None when there is none."""
    flags = cpu_flags()
    for flag in NATIVE_CPU_FLAGS[method]:
        if flag in flags:
            return flag
    return None


def check_supported(method: str, device: torch.device) -> None:
    kind = device_class(device)
    if kind not in QUANTIZATION_DEVICES[method]:
        raise QuantizationUnsupported(
            f"{method} runs on {' and '.join(sorted(QUANTIZATION_DEVICES[method]))} only, "
            f"not on {kind} (see the device x method matrix in docs/quantization.md)")
    if method in CAST_DTYPES and kind == "cpu" and cpu_half_support(method) is None:
        raise QuantizationUnsupported(
            f"{method} on this CPU would be emulated, slower than fp32: it has none of "
            f"{', '.join(NATIVE_CPU_FLAGS[method])} (torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}); use int8-dynamic or "
            f"int8-weight-only, or a GPU")


def quantize_module(module: torch.nn.Module, method: str, device: torch.device
                    ) -> QuantizationResult:
    """Quantize `module` (in place where the method allows) or raise QuantizationUnsupported."""
    if method == "none":
        return QuantizationResult(module, None, "none")
    check_supported(method, device)
    if method in CAST_DTYPES:
        dtype = CAST_DTYPES[method]
        return QuantizationResult(module.to(dtype), dtype, f"cast to {dtype}")
    if isinstance(module, torch.jit.ScriptModule):
        raise QuantizationUnsupported(
            f"{method} cannot rewrite a TorchScript module; serve it as safetensors with "
            f"--architecture, or as transformers")
    linear_names = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linear_names:
        raise QuantizationUnsupported(
            f"{method} quantizes nn.Linear layers and this model has none (an ExportedProgram "
            f"holds its weights as graph constants): it would serve full precision")
    if method == "int8-dynamic":
        return _int8_dynamic(module, linear_names)
    return _weight_only(module, method, device, len(linear_names))


def _int8_dynamic(module: torch.nn.Module, linear_names: list[str]) -> QuantizationResult:
    """torch.ao's dynamic int8 (fbgemm/onednn kernels): per-channel weights, FFN outputs kept.

    torchao's Int8DynamicActivationInt8WeightConfig runs eager on CPU about 13x slower than
    fp32 here, so the deprecated torch.ao path stays while torch still ships it.
    """
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        raise QuantizationUnsupported(
            f"int8-dynamic needs torch.ao.quantization.quantize_dynamic, which torch "
            f"{torch.__version__} no longer ships") from None
    chosen = [n for n in linear_names if not _keep_full_precision(n)] or linear_names
    spec = {name: per_channel_dynamic_qconfig for name in chosen}
    quantized = quantize_dynamic(module, spec, dtype=torch.qint8, inplace=True)
    kept = len(linear_names) - len(chosen)
    return QuantizationResult(
        quantized, None, f"torch.ao quantize_dynamic qint8 per-channel ({len(chosen)} Linear, "
        f"{kept} FFN output kept fp32)")


def _keep_full_precision(name: str) -> bool:
    return name.endswith(DYNAMIC_KEEP_SUFFIXES) and not any(
        part in name for part in DYNAMIC_KEEP_EXCEPT)


def _weight_only(module: torch.nn.Module, method: str, device: torch.device,
                 linear_count: int) -> QuantizationResult:
    try:
        from torchao.quantization import quantize_
    except ImportError:
        raise QuantizationUnsupported(
            f"{method} needs torchao (pip install 'kubemaas[runtime]')") from None
    backends = []
    # torchao's CUDA int4 kernel (tinygemm) takes bf16 activations and weights
    cast = torch.bfloat16 if method == "int4-weight-only" and device.type == "cuda" else None
    if cast is not None:
        module = module.to(cast)
    try:
        for config, backend, accepts in _weight_only_configs(method, device, module):
            quantize_(module, config, filter_fn=accepts)
            backends.append(backend)
    except (ImportError, NotImplementedError, AssertionError, RuntimeError) as exc:
        raise QuantizationUnsupported(
            f"{method} on {device.type}: torchao {', '.join(backends) or method} failed: "
            f"{type(exc).__name__}: {exc}") from None
    quantized = sum(1 for m in module.modules()
                    if isinstance(m, torch.nn.Linear) and _is_quantized(m.weight))
    if quantized == 0:
        raise QuantizationUnsupported(f"{method}: torchao left every Linear in full precision")
    return QuantizationResult(
        module, cast, f"torchao {'; '.join(backends)} ({quantized} of {linear_count} Linear)")


def _is_quantized(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.nn.Parameter, torch.Tensor) or (
        type(getattr(weight, "data", None)) not in (None, torch.Tensor))


def _int4_group_size(linear: torch.nn.Linear) -> int | None:
    """The largest group size up to INT4_GROUP_SIZE that divides the input features."""
    size = INT4_GROUP_SIZE
    while size >= 2:
        if linear.in_features % size == 0:
            return size
        size //= 2
    return None


def _weight_only_configs(method: str, device: torch.device, module: torch.nn.Module):
    """(config, description, filter_fn) triples to apply in turn."""
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup

    def linear(m, _fqn):
        return isinstance(m, torch.nn.Linear)

    if method == "int8-weight-only":
        return [(Int8WeightOnlyConfig(), "Int8WeightOnlyConfig per-row", linear)]
    if device.type != "cpu":
        from torchao.quantization.quantize_.workflows.int4.int4_packing_format import (
            Int4PackingFormat,
        )

        # not measured: no GPU was lent when this was written (docs/quantization.md)
        config = Int4WeightOnlyConfig(group_size=128,
                                      int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
        return [(config, "Int4WeightOnlyConfig tile-packed group 128, bf16",
                 lambda m, fqn: linear(m, fqn) and m.in_features % 128 == 0)]
    # torchao's Int4WeightOnlyConfig has no fp32 CPU kernel (it needs mslk or bf16 tiles):
    # 4-bit values in groups, stored unpacked as int8, dequantized per forward.
    sizes = sorted({_int4_group_size(m) for m in module.modules()
                    if isinstance(m, torch.nn.Linear)} - {None}, reverse=True)
    return [(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(size)),
             f"IntxWeightOnlyConfig int4 group {size}",
             lambda m, fqn, size=size: linear(m, fqn) and _int4_group_size(m) == size)
            for size in sizes]
