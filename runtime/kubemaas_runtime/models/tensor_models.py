"""Tensor-in, tensor-out models: TorchScript, torch.export ExportedProgram, and a safetensors
state dict loaded into a module built by `--architecture module:factory`."""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubemaas_runtime.errors import ModelLoadFailed, QuantizationUnsupported
from kubemaas_runtime.models.base import (
    SIGNATURE_FILE,
    Model,
    Signature,
    TensorSpec,
    read_signature_file,
)
from kubemaas_runtime.protocol import Tensor
from kubemaas_runtime.tensors import TORCH_DTYPES, from_torch, to_torch, v2_datatype


def find_model_file(path: Path, suffixes: tuple[str, ...]) -> Path:
    """`path` itself when it is a file, else the one file in it ending with one of `suffixes`."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise ModelLoadFailed(f"model path {path} does not exist")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise ModelLoadFailed(f"expected exactly one {'/'.join(suffixes)} file in {path}, "
                              f"found {names}")
    return found[0]


def output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


class TensorModel(Model):
    """Shared batching for modules called as module(*inputs) -> tensor | tuple | dict."""

    def __init__(self, options) -> None:
        super().__init__(options)
        self._module: Callable[..., Any] | None = None
        self._input_dtype: torch.dtype | None = None  # floating inputs are cast to it
        self.batchable = True
        self._warmup_rows = 1

    # -- loading ---------------------------------------------------------------------------
    def _finish_load(self, module: Callable[..., Any], signature: Signature) -> None:
        self._module = module
        self.signature = signature
        if not signature.outputs and _fully_shaped(signature.inputs):
            self.signature = Signature(signature.inputs, self._discover_outputs())
        if self.options.quantization != "none":
            if not isinstance(module, torch.nn.Module):
                raise QuantizationUnsupported(
                    f"{self.options.quantization}: the loaded program is not an nn.Module")
            # full precision takes the probes first: floating inputs in its parameters' dtype
            self._input_dtype = _floating_dtype(module)
            result = self.quantize(module)
            self._module = result.module
            self._input_dtype = result.input_dtype or self._input_dtype
        self.ready = True

    def _discover_outputs(self) -> tuple[TensorSpec, ...]:
        with torch.inference_mode():
            outputs = self._call(self._example_inputs(self._warmup_rows))
        names = output_names(len(outputs))
        return tuple(
            TensorSpec(name, v2_datatype(t.dtype),
                       (-1, *t.shape[1:]) if self.batchable else tuple(t.shape))
            for name, t in zip(names, outputs))

    def _example_inputs(self, rows: int) -> list[torch.Tensor]:
        tensors = []
        for spec in self.signature.inputs:
            dims = [rows if i == 0 and d == -1 else max(d, 1) for i, d in enumerate(spec.shape)]
            tensors.append(torch.zeros(dims, dtype=TORCH_DTYPES[spec.datatype],
                                       device=self.device))
        return tensors

    def warmup(self) -> None:
        if _fully_shaped(self.signature.inputs):
            self._call(self._example_inputs(self._warmup_rows))

    # -- inference -------------------------------------------------------------------------
    def _call(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._input_dtype is not None:
            args = [a.to(self._input_dtype) if a.is_floating_point() else a for a in args]
        result = self._module(*args)
        if isinstance(result, torch.Tensor):
            outputs = [result]
        elif isinstance(result, dict):
            outputs = list(result.values())
        elif isinstance(result, (tuple, list)):
            outputs = list(result)
        else:
            raise TypeError(f"model returned {type(result).__name__}, expected tensors")
        declared = self.signature.outputs
        if declared and len(declared) == len(outputs):
            outputs = [_cast_to(t, spec) for t, spec in zip(outputs, declared)]
        return outputs

    def predict(self, batch: list[dict[str, Tensor]]) -> list[list[Tensor]]:
        results: list[list[Tensor]] = [[] for _ in batch]
        for group in self._groups(batch):
            rows = [batch[i][self.signature.inputs[0].name].shape[0] for i in group]
            args = []
            for spec in self.signature.inputs:
                arrays = [batch[i][spec.name].data for i in group]
                array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
                args.append(to_torch(array, batch[group[0]][spec.name].datatype).to(self.device))
            outputs = self._call(args)
            if not self.signature.outputs:  # signature guessed: learn outputs from the first run
                self.signature = Signature(self.signature.inputs, tuple(
                    TensorSpec(n, v2_datatype(t.dtype), None, exact=False)
                    for n, t in zip(output_names(len(outputs)), outputs)))
            names = [s.name for s in self.signature.outputs]
            if len(names) != len(outputs):
                raise RuntimeError(f"model returned {len(outputs)} outputs, "
                                   f"signature declares {len(names)}")
            for name, output in zip(names, outputs):
                if output.dim() == 0 or output.shape[0] != sum(rows):
                    raise RuntimeError(f"output '{name}' has shape {list(output.shape)}; its "
                                       f"first dimension must be the batch size {sum(rows)}")
                for i, piece in zip(group, torch.split(output, rows)):
                    results[i].append(from_torch(name, piece))
        return results

    def _groups(self, batch: list[dict[str, Tensor]]) -> list[list[int]]:
        """Requests that can share one forward: same non-batch dims (and batchable)."""
        if not self.batchable:
            return [[i] for i in range(len(batch))]
        groups: dict[tuple, list[int]] = {}
        for i, inputs in enumerate(batch):
            key = tuple((t.datatype, t.shape[1:]) for t in inputs.values())
            groups.setdefault(key, []).append(i)
        return list(groups.values())


def _floating_dtype(module: torch.nn.Module) -> torch.dtype | None:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _fully_shaped(specs: tuple[TensorSpec, ...]) -> bool:
    return bool(specs) and all(
        s.exact and s.shape is not None and s.datatype in TORCH_DTYPES for s in specs)


def _cast_to(tensor: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """Quantized variants answer in the datatypes the signature declares."""
    dtype = TORCH_DTYPES.get(spec.datatype)
    if dtype is not None and tensor.dtype != dtype and tensor.is_floating_point():
        return tensor.to(dtype)
    return tensor


def _guessed_inputs(names: list[str]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name, "FP32", None, exact=False) for name in names)


class TorchScriptModel(TensorModel):
    platform = "pytorch_torchscript"

    def load(self) -> None:
        path = find_model_file(self.options.path, (".pt", ".pth", ".torchscript", ".ts"))
        extra = {SIGNATURE_FILE: ""}
        try:
            module = torch.jit.load(str(path), map_location=self.device, _extra_files=extra)
        except RuntimeError as exc:
            raise ModelLoadFailed(f"{path} is not a TorchScript archive: {exc}") from None
        module.eval()
        signature = read_signature_file(path.parent)
        if signature is None and extra[SIGNATURE_FILE]:
            raw = json.loads(extra[SIGNATURE_FILE])
            signature = Signature(tuple(TensorSpec.from_dict(s) for s in raw["inputs"]),
                                  tuple(TensorSpec.from_dict(s) for s in raw["outputs"]))
        if signature is None:
            names = [a.name for a in module.forward.schema.arguments[1:]]
            signature = Signature(_guessed_inputs(names), ())
        self._finish_load(module, signature)


class ExportedProgramModel(TensorModel):
    platform = "pytorch_exported_program"

    def load(self) -> None:
        path = find_model_file(self.options.path, (".pt2",))
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad archive
            raise ModelLoadFailed(f"{path} is not a torch.export archive: {exc}") from None
        signature = read_signature_file(path.parent) or self._introspect(program)
        module = program.module().to(self.device)
        self._finish_load(module, signature)

    def _introspect(self, program) -> Signature:
        from torch.export.graph_signature import InputKind, OutputKind

        nodes = {node.name: node for node in program.graph.nodes}
        lows = {str(sym): int(vr.lower) for sym, vr in program.range_constraints.items()}

        def spec(name: str, arg_name: str) -> TensorSpec:
            value = nodes[arg_name].meta["val"]
            dims = []
            for i, dim in enumerate(value.shape):
                if isinstance(dim, torch.SymInt):
                    dims.append(-1)
                    if i == 0:
                        self._warmup_rows = max(self._warmup_rows,
                                                lows.get(str(dim.node.expr), 1))
                else:
                    dims.append(int(dim))
                    if i == 0:
                        self.batchable = False
            return TensorSpec(name, v2_datatype(value.dtype), tuple(dims))

        sig = program.graph_signature
        inputs = tuple(spec(s.arg.name, s.arg.name) for s in sig.input_specs
                       if s.kind == InputKind.USER_INPUT)
        user_outputs = [s for s in sig.output_specs if s.kind == OutputKind.USER_OUTPUT]
        names = output_names(len(user_outputs))
        outputs = tuple(spec(n, s.arg.name) for n, s in zip(names, user_outputs))
        return Signature(inputs, outputs)


class SafetensorsModel(TensorModel):
    platform = "pytorch_safetensors"

    def load(self) -> None:
        from safetensors.torch import load_file

        path = find_model_file(self.options.path, (".safetensors",))
        module = build_architecture(self.options.architecture, path.parent)
        try:
            module.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as exc:
            raise ModelLoadFailed(f"state dict {path.name} does not fit "
                                  f"{self.options.architecture}: {exc}") from None
        module = module.to(self.device).eval()
        signature = read_signature_file(path.parent)
        if signature is None:
            params = inspect.signature(module.forward).parameters.values()
            names = [p.name for p in params
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            signature = Signature(_guessed_inputs(names), ())
        self._finish_load(module, signature)


def build_architecture(reference: str | None, model_dir: Path) -> torch.nn.Module:
    """Call `package.module:factory`, with config.json's keys as arguments when present."""
    if not reference or ":" not in reference:
        raise ModelLoadFailed("--architecture module:factory is required for safetensors")
    module_name, _, attr = reference.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadFailed(f"cannot import architecture {reference}: {exc}") from None
    config_file = model_dir / "config.json"
    kwargs = json.loads(config_file.read_text()) if config_file.is_file() else {}
    module = factory(**kwargs)
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadFailed(f"{reference} returned {type(module).__name__}, not a Module")
    return module
