"""Which engine serves a model, and over how many GPUs: decided once at start, before loading.

- `vllm`: vLLM in this process (generation/vllm_engine.py). It needs vLLM to import (its own
  venv and image flavour: it pins its own torch), `--task text-generation`, `--format
  transformers`, and an architecture in vLLM's registry; anything else is refused at start with
  `ModelLoadFailed` saying what to change. It splits a model over `--tensor-parallel-size` GPUs.
- `builtin`: the project's PyTorch engine; it runs a model on one device, so a split over
  several GPUs is refused at start, never accepted and then ignored (a 70B model the operator
  placed on two GPUs must not be loaded whole onto one of them).
- `auto`: vLLM when all of vLLM's conditions hold, else builtin (GGUF, an architecture vLLM
  lacks, an image without vLLM, an encoder), with the reason in the start-up log.

`choose_engine` is pure; `probe_vllm` and `model_architectures` gather what it is given.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

from kubemaas_runtime.errors import ModelLoadFailed


@dataclasses.dataclass(frozen=True)
class EngineChoice:
    engine: str  # the engine that runs: "builtin" or "vllm"
    reason: str  # why, for the start-up log
    tensor_parallel_size: int = 1


@dataclasses.dataclass(frozen=True)
class VllmAvailability:
    """vLLM as this process sees it: its version (None when it does not import) and the
    architectures its model registry serves."""

    version: str | None = None
    architectures: frozenset[str] = frozenset()
    error: str | None = None  # why it does not import


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    task: str | None
    format: str
    architectures: tuple[str, ...] = ()


def choose_engine(requested: str, tensor_parallel_size: int | None, gpus: int,
                  model: ModelFacts | None = None,
                  vllm: VllmAvailability | None = None) -> EngineChoice:
    """`requested` is --engine (auto|builtin|vllm); `gpus` the CUDA devices the model would
    run on: every one this process sees, 0 on CPU (`--device cpu` uses none)."""
    split = tensor_parallel_size if tensor_parallel_size is not None else max(gpus, 1)
    vllm = vllm or VllmAvailability(error="not probed")
    if requested == "vllm":
        problem = _why_not_vllm(model, vllm)
        if problem is not None:
            raise ModelLoadFailed(f"--engine vllm: {problem}; use --engine builtin (or auto)")
        return EngineChoice("vllm", f"requested (vLLM {vllm.version})", split)
    if requested == "auto":
        problem = _why_not_vllm(model, vllm)
        if problem is None:
            return EngineChoice("vllm", f"auto: vLLM {vllm.version} imports and serves "
                                        f"{model.architectures[0]} from --format transformers",
                                split)
        reason = f"auto: {problem}"
    else:
        reason = "requested"
    if split > 1:
        given = (f"--tensor-parallel-size {tensor_parallel_size}" if tensor_parallel_size
                 else f"{gpus} visible GPUs (the default tensor-parallel size)")
        raise ModelLoadFailed(
            f"the builtin engine cannot split a model over several GPUs ({given}; {reason}): "
            f"give the pod one GPU, set --tensor-parallel-size 1 to run on the first, or serve "
            f"a transformers model with --engine vllm from the kubemaas-runtime-vllm image")
    return EngineChoice("builtin", reason, 1)


def _why_not_vllm(model: ModelFacts | None, vllm: VllmAvailability) -> str | None:
    if model is not None and model.task != "text-generation":
        return ("vLLM serves --task text-generation here, not "
                f"{model.task or 'a tensor model (no --task)'}")
    if model is not None and model.format != "transformers":
        return f"vLLM serves --format transformers, not {model.format}"
    if vllm.version is None:
        return f"vLLM does not import in this image ({vllm.error or 'not installed'})"
    if model is None or not model.architectures:
        return "the model's config.json names no architecture"
    missing = [a for a in model.architectures if a not in vllm.architectures]
    if missing:
        return f"vLLM {vllm.version} has no {missing[0]} in its model registry"
    return None


def probe_vllm() -> VllmAvailability:
    """Import vLLM's registry (seconds) only when vLLM is installed."""
    if importlib.util.find_spec("vllm") is None:
        return VllmAvailability(error="not installed")
    try:
        import vllm
        from vllm.model_executor.models.registry import ModelRegistry
    except Exception as exc:  # noqa: BLE001 - a broken install is "does not import"
        return VllmAvailability(error=f"{type(exc).__name__}: {str(exc)[:200]}")
    return VllmAvailability(vllm.__version__, frozenset(ModelRegistry.get_supported_archs()))


def model_architectures(path: Path) -> tuple[str, ...]:
    """The `architectures` of a transformers directory's config.json (empty when none)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return ()
    names = config.get("architectures") if isinstance(config, dict) else None
    return tuple(a for a in names or () if isinstance(a, str))
