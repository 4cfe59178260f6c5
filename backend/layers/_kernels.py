"""The fused kernels of `flab_kernels.ops` for a layer, when the one dispatch rule (flab_kernels/dispatch.py: the
engine's choice, made from its attention backend) says Triton; None means: the layer's own torch math."""

from __future__ import annotations

from typing import Callable

import torch

from flab_kernels import ops as _ops
from flab_kernels.dispatch import use_triton


def triton_kernel(name: str, x: torch.Tensor) -> Callable | None:
    """`flab_kernels.ops.<name>` when the Triton kernels run for `x`; None: use the torch math."""
    return getattr(_ops, name) if use_triton(x) else None
