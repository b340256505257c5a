"""The model contract: `load()`, `ready`, `predict(batch)`, plus the signature checks shared by
every model kind (run on the event loop before a request joins a batch)."""

from __future__ import annotations

import abc
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from kubemaas_runtime.config import ServeConfig
from kubemaas_runtime.errors import InvalidInput
from kubemaas_runtime.gate import AccuracyGate
from kubemaas_runtime.protocol import InferHeader, InferRequest, InputHeader, Tensor
from kubemaas_runtime.quantization import QuantizationResult, check_supported, quantize_module

SIGNATURE_FILE = "signature.json"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output. `shape` uses -1 for a variable dimension and starts with the batch
    dimension; None means the rank is unknown. `exact` False: the datatype is a guess, so any
    numeric datatype is accepted."""

    name: str
    datatype: str
    shape: tuple[int, ...] | None
    exact: bool = True

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype,
                "shape": list(self.shape) if self.shape is not None else [-1]}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TensorSpec:
        return cls(str(raw["name"]), str(raw["datatype"]), tuple(int(d) for d in raw["shape"]))


@dataclasses.dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def read_signature_file(model_dir: Path) -> Signature | None:
    """`signature.json` beside the model files, when there is one (Triton's config.pbtxt role)."""
    path = model_dir / SIGNATURE_FILE
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return Signature(tuple(TensorSpec.from_dict(s) for s in raw["inputs"]),
                     tuple(TensorSpec.from_dict(s) for s in raw["outputs"]))


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """What a model kind needs from the serve configuration."""

    path: Path
    name: str
    variant: str = ServeConfig.variant
    task: str | None = None
    architecture: str | None = None
    quantization: str = ServeConfig.quantization
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    max_batch_size: int = ServeConfig.max_batch_size
    max_drift: float | None = None
    # text-generation limits (config.py; None: from the model); the defaults are the flags'
    max_model_len: int | None = None
    max_num_seqs: int = ServeConfig.max_num_seqs
    kv_cache_tokens: int | None = None
    kv_cache_memory: int | None = None
    max_num_batched_tokens: int = ServeConfig.max_num_batched_tokens
    compile: str = ServeConfig.compile  # --compile (generation/compiled_decode.py)
    max_queue: int = ServeConfig.max_queue
    adapters: Any = None  # generation.adapter_sync.AdapterOptions (LoRA), None: off


class Model(abc.ABC):
    platform = "pytorch"

    def __init__(self, options: ModelOptions) -> None:
        self.options = options
        self.name = options.name
        self.device = options.device
        self.ready = False
        self.signature = Signature((), ())
        self.quantization = "none"  # what load() actually applied
        self.quantization_backend = "none"
        self.drift: float | None = None  # measured by the accuracy gate at warm-up
        self._gate: AccuracyGate | None = None

    @abc.abstractmethod
    def load(self) -> None:
        """Read the files, apply quantization, move to the device; set `signature`."""

    @abc.abstractmethod
    def predict(self, batch: list[dict[str, Tensor]]) -> list[list[Tensor]]:
        """Run one batch of validated requests; one list of output tensors per request.

        Called off the event loop, under torch.inference_mode.
        """

    def prepare(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-request work that can fail for this request alone (decoding text, ...), done
        before it joins a batch so that a bad request never fails anyone else's."""
        return inputs

    def warmup(self) -> None:
        """Run a forward pass or two so the first request does not pay for lazy setup."""

    # -- quantization and the accuracy gate ------------------------------------------------
    def quantize(self, module: torch.nn.Module) -> QuantizationResult:
        """Called by load() while the model still serves full precision: take the probes'
        reference outputs (unless a probe file holds them), then quantize `module`."""
        method = self.options.quantization
        if method != "none":
            check_supported(method, self.device)
            self._gate = AccuracyGate.prepare(self.options.path, self.signature.inputs,
                                              self.probe_forward, self.options.max_drift)
        result = quantize_module(module, method, self.device)
        self.quantization = method
        self.quantization_backend = result.backend
        return result

    def probe_forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.inference_mode():
            return {t.name: t for t in self.predict([inputs])[0]}

    def check_accuracy(self) -> None:
        """The gate, at warm-up: raises QuantizationDriftExceeded above --max-drift."""
        if self._gate is not None:
            self.drift = self._gate.check(self.probe_forward)

    # -- shared ----------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": self.platform,
            "inputs": [s.metadata() for s in self.signature.inputs],
            "outputs": [s.metadata() for s in self.signature.outputs],
            "parameters": {
                "variant": self.options.variant,
                "quantization": self.quantization,
                "quantization_backend": self.quantization_backend,
                **({"quantization_drift": self.drift} if self.drift is not None else {}),
                **({"max_drift": self.options.max_drift}
                   if self.options.max_drift is not None else {}),
                "device": str(self.device),
                "max_batch_size": self.options.max_batch_size,
                **({"task": self.options.task} if self.options.task else {}),
            },
        }

    def validate(self, request: InferRequest | InferHeader
                 ) -> tuple[dict[str, Tensor | InputHeader], int]:
        """Check the request against the signature; its inputs by name and its row count.
        Runs on the parsed header, before any tensor data is decoded."""
        specs = {s.name: s for s in self.signature.inputs}
        given: dict[str, Tensor | InputHeader] = {t.name: t for t in request.inputs}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            raise InvalidInput(f"unknown input {', '.join(map(repr, unknown))}; model "
                               f"'{self.name}' takes {', '.join(map(repr, specs))}")
        missing = [n for n in specs if n not in given]
        if missing:
            raise InvalidInput(f"missing input {', '.join(map(repr, missing))}")
        rows: int | None = None
        for name, spec in specs.items():
            tensor = given[name]
            check_tensor(spec, tensor)
            if not tensor.shape:
                raise InvalidInput(f"input '{name}': needs a batch dimension, got a scalar")
            if rows is None:
                rows = tensor.shape[0]
            elif tensor.shape[0] != rows:
                raise InvalidInput(f"input '{name}': batch dimension {tensor.shape[0]} differs "
                                   f"from the other inputs' {rows}")
        if not rows:
            raise InvalidInput("request has no rows: the batch dimension must be at least 1")
        if request.outputs is not None and self.signature.outputs:
            known = {s.name for s in self.signature.outputs}
            for name in request.outputs:
                if name not in known:
                    raise InvalidInput(f"unknown output '{name}'; model '{self.name}' has "
                                       f"{', '.join(map(repr, sorted(known)))}")
        return given, rows


def check_tensor(spec: TensorSpec, tensor: Tensor | InputHeader) -> None:
    where = f"input '{spec.name}'"
    if spec.exact and tensor.datatype != spec.datatype:
        raise InvalidInput(f"{where}: expected datatype {spec.datatype}, got {tensor.datatype}")
    if not spec.exact and tensor.datatype == "BYTES":
        raise InvalidInput(f"{where}: expected a numeric datatype, got BYTES")
    if spec.shape is None:
        return
    expected = list(spec.shape)
    if len(tensor.shape) != len(expected) or any(
            want != -1 and want != got for want, got in zip(expected, tensor.shape)):
        raise InvalidInput(f"{where}: expected shape {expected} (-1: any size), "
                           f"got {list(tensor.shape)}")


def run_predict(model: Model, batch: list[dict[str, Tensor]]) -> list[list[Tensor]]:
    """The worker-thread entry for one batch."""
    with torch.inference_mode():
        return model.predict(batch)


def load_and_warm_up(model: Model) -> None:
    """The worker-thread entry for loading: load, warm up under inference_mode, then the
    accuracy gate of a quantized variant."""
    model.load()
    model.ready = False  # ready only once warmed up and through the accuracy gate
    with torch.inference_mode():
        model.warmup()
    model.check_accuracy()
    model.ready = True
