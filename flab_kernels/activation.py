"""Gated activations `act(x[..., :I]) * x[..., I:]`: torch reference (HF semantics), Triton, dispatch.

Input (..., 2*I) -> output (..., I). Like HF (`act_fn(gate) * up` in the model dtype), the
activation is rounded to the input dtype before the product, and the product rounded again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flab_kernels._math import tanh_f32
from flab_kernels._triton import require_triton, tl, triton
from flab_kernels.dispatch import use_triton

GELU_APPROXIMATIONS = ("none", "tanh")


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:  # (..., 2I) -> (..., I)
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_and_mul_torch(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:  # (..., 2I) -> (..., I)
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate=approximate) * x[..., d:]


@triton.jit
def _act_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_o,
    inter,  # I
    ACT: tl.constexpr,  # 0 silu, 1 gelu (erf), 2 gelu (tanh approximation)
    BLOCK: tl.constexpr,
):
    # grid: (rows, cdiv(I, BLOCK))
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi) * (g + 0.044715 g^3)
        a = 0.5 * g * (1.0 + tanh_f32(inner))
    a = a.to(x_ptr.dtype.element_ty).to(tl.float32)  # round like torch's separate act op
    tl.store(out_ptr + row * stride_o + cols, (a * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def _act_and_mul_triton(x: torch.Tensor, act: int) -> torch.Tensor:
    require_triton()
    if x.shape[-1] % 2:
        raise ValueError(f"last dim must be even (gate | up), got {x.shape[-1]}")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])  # (N, 2I)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)  # (N, I)
    block = min(triton.next_power_of_2(inter), 1024)
    if x2.shape[0]:
        _act_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2,
            out,
            x2.stride(0),
            out.stride(0),
            inter,
            ACT=act,
            BLOCK=block,
        )
    return out.view(*x.shape[:-1], inter)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    return _act_and_mul_triton(x, 0)


def gelu_and_mul_triton(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    return _act_and_mul_triton(x, 1 if approximate == "none" else 2)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton on CUDA (or with FLAB_FORCE_TRITON=1), torch otherwise."""
    return silu_and_mul_triton(x) if use_triton(x) else silu_and_mul_torch(x)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Triton on CUDA (or with FLAB_FORCE_TRITON=1), torch otherwise."""
    return gelu_and_mul_triton(x, approximate) if use_triton(x) else gelu_and_mul_torch(x, approximate)
