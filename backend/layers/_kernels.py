"""Access to the Triton kernels of `kernels.ops`, used for CUDA tensors only (the torch math runs elsewhere)."""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch

try:  # the kernels package is optional: without it every op runs its torch math
    from kernels import ops as _ops
except ImportError:  # pragma: no cover - exercised only where kernels/ is absent
    _ops: ModuleType | None = None


def cuda_kernel(name: str, x: torch.Tensor) -> Callable | None:
    """`kernels.ops.<name>` when `x` lives on CUDA and the op exists there; None means: use the torch math."""
    if _ops is None or not x.is_cuda:
        return None
    return getattr(_ops, name, None)
