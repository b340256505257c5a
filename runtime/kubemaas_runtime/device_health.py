"""Which failures leave the accelerator unusable (so the process must exit and the pod restart)
and which belong to one batch (retried member by member, served on)."""

from __future__ import annotations

from collections.abc import Callable

import torch

# CUDA's sticky errors: once one happens the context is unusable until the process ends.
STICKY_CUDA_ERRORS = (
    "illegal memory access", "device-side assert", "unspecified launch failure",
    "misaligned address", "illegal instruction", "uncorrectable ECC error",
    "an illegal instruction", "CUDA error: unknown error", "device not ready",
    "cudaErrorLaunchFailure", "CUBLAS_STATUS_EXECUTION_FAILED", "CUDNN_STATUS_EXECUTION_FAILED",
    "NVML_SUCCESS == r INTERNAL ASSERT FAILED",
)


def probe_cuda(device: torch.device) -> bool:
    """True when the device still runs a trivial kernel and synchronises."""
    try:
        torch.cuda.synchronize(device)
        return bool((torch.ones(1, device=device) + 1).item() == 2)
    except Exception:  # noqa: BLE001 - any failure here means the device is gone
        return False


def device_lost(exc: BaseException, device: torch.device,
                probe: Callable[[torch.device], bool] = probe_cuda) -> bool:
    """Whether `exc`, raised by a forward pass on `device`, means the device is unusable.

    Out of memory is not (the batch alone failed; smaller ones may run). A sticky CUDA error
    is. Any other error on a CUDA device counts when the device no longer passes `probe`.
    """
    if device.type != "cuda":
        return False
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    text = str(exc)
    if any(marker in text for marker in STICKY_CUDA_ERRORS):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return not probe(device)
