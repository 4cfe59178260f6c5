"""Access to the Triton kernels of `flab_kernels.ops`, used for CUDA tensors only (the torch math runs elsewhere)."""

from __future__ import annotations

from typing import Callable

import torch

from flab_kernels import ops as _ops


def cuda_kernel(name: str, x: torch.Tensor) -> Callable | None:
    """`flab_kernels.ops.<name>` when `x` lives on CUDA and the op exists there; None means: use the torch math."""
    if not x.is_cuda:
        return None
    return getattr(_ops, name, None)
