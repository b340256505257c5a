"""Which forward-pass failures make the process exit: decided with fake errors (no GPU)."""

from __future__ import annotations

import pytest
import torch
from kubemaas_runtime.device_health import device_lost

CUDA = torch.device("cuda")


def healthy(device):
    return True


def broken(device):
    return False


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA"),
    RuntimeError("CUDA error: unspecified launch failure"),
])
def test_sticky_cuda_errors_mean_the_device_is_lost(error):
    assert device_lost(error, CUDA, probe=healthy)


def test_out_of_memory_is_one_batch_failing():
    assert not device_lost(torch.OutOfMemoryError("CUDA out of memory"), CUDA, probe=broken)


def test_another_error_counts_only_when_the_device_fails_its_probe():
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    assert not device_lost(error, CUDA, probe=healthy)
    assert device_lost(error, CUDA, probe=broken)


def test_cpu_errors_never_end_the_process():
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    assert not device_lost(error, torch.device("cpu"), probe=broken)
