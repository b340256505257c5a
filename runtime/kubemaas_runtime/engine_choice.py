"""Which engine serves a model, and over how many GPUs: decided once at start, before loading.

Only the builtin PyTorch engine is part of this runtime so far, and it runs a model on one
device. So `--engine vllm` and any split over several GPUs are refused at start with
`ModelLoadFailed` saying what to change, never accepted and then ignored (a 70B model the
operator placed on two GPUs must not be loaded whole onto one of them).
"""

from __future__ import annotations

import dataclasses

from kubemaas_runtime.errors import ModelLoadFailed


@dataclasses.dataclass(frozen=True)
class EngineChoice:
    engine: str  # the engine that runs: "builtin"
    reason: str  # why, for the start-up log


def choose_engine(requested: str, tensor_parallel_size: int | None, gpus: int) -> EngineChoice:
    """`requested` is --engine (auto|builtin|vllm); `gpus` the CUDA devices the model would
    run on: every one this process sees, 0 on CPU (`--device cpu` uses none)."""
    if requested == "vllm":
        raise ModelLoadFailed(
            "--engine vllm: the vLLM engine is not part of this runtime version; use --engine "
            "builtin (or auto)")
    split = tensor_parallel_size if tensor_parallel_size is not None else max(gpus, 1)
    if split > 1:
        given = (f"--tensor-parallel-size {tensor_parallel_size}" if tensor_parallel_size
                 else f"{gpus} visible GPUs (the default tensor-parallel size)")
        raise ModelLoadFailed(
            f"the builtin engine cannot split a model over several GPUs ({given}): give the pod "
            f"one GPU, or set --tensor-parallel-size 1 to run on the first")
    reason = ("requested" if requested == "builtin"
              else "auto: the vLLM engine is not part of this runtime version")
    return EngineChoice("builtin", reason)
