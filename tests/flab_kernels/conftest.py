"""The Triton kernel tests build their tensors on the default device that `kernel_device` sets: CUDA where there
is a GPU (the kernels compiled for real: tests/gpu_check.sh), else the CPU (through the interpreter, which
tests/conftest.py turns on). Seeded inputs are generated on the CPU first (helpers.py), so both see the same
values. Tests of the CPU dispatch open `with torch.device("cpu")` themselves."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def kernel_device():
    if not torch.cuda.is_available():  # the CPU is already the default: nothing to set
        yield torch.device("cpu")
        return
    previous = torch.get_default_device()
    torch.set_default_device("cuda")
    try:
        yield torch.device("cuda")
    finally:
        torch.set_default_device(previous)
