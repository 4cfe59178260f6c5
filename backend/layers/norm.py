"""RMSNorm (Llama and Gemma flavours) with an optional fused residual add.

Torch math reproduces transformers bit for bit:
  offset 0 (Llama): weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(dtype)
  offset 1 (Gemma): ((x.float() * rsqrt(...)) * (1 + weight.float())).to(dtype)
On CUDA the Triton kernel of `flab_kernels.ops.rms_norm` runs instead.
"""

from __future__ import annotations

import torch
from torch import nn

from backend.layers._kernels import triton_kernel
from flab_kernels.norm import rms_norm_torch


def rms_norm(
    x: torch.Tensor,  # (..., H)
    weight: torch.Tensor,  # (H,)
    eps: float,
    residual: torch.Tensor | None = None,  # (..., H)
    offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) or, with `residual`, (norm(x + residual), x + residual)."""
    kernel = triton_kernel("rms_norm", x)
    if kernel is not None:
        return kernel(x, weight, eps, residual=residual, offset=offset)
    return rms_norm_torch(x, weight, eps, residual=residual, offset=offset)


class RMSNorm(nn.Module):
    """`forward(x)` -> normed; `forward(x, residual)` -> (normed(x + residual), x + residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual, self.offset)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}"
