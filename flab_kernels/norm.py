"""RMSNorm with optional fused residual add: torch reference (HF semantics), Triton kernel, dispatch.

    rms_norm(x, weight, eps)                 -> out
    rms_norm(x, weight, eps, residual=r)     -> (out, new_residual)   new_residual = x + r (in x.dtype)
    offset=1.0 gives Gemma's `(1 + weight)`.

HF semantics reproduced bit-for-bit on the element level:
  Llama (offset 0): normed = (x.float() * rsqrt(mean(x.float()^2) + eps)).to(dtype); out = weight * normed
  Gemma (offset 1): out = (x.float() * rsqrt(...) * (1 + weight.float())).to(dtype)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flab_kernels._triton import require_triton, tl, triton
from flab_kernels.dispatch import use_triton


def rms_norm_torch(
    x: torch.Tensor,  # (..., H)
    weight: torch.Tensor,  # (H,)
    eps: float,
    residual: torch.Tensor | None = None,  # (..., H)
    offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual  # HF: hidden = residual + hidden, in the model dtype
        residual = x
    if offset == 0.0:
        # F.rms_norm upcasts to fp32, normalises (x * rsqrt(mean(x^2) + eps)) and rounds back to x's dtype:
        # HF's `hidden.to(input_dtype)`; the weight multiplies in the model dtype as in HF (bit for bit).
        out = weight * F.rms_norm(x, (x.shape[-1],), eps=eps)
    else:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
        out = (normed * (offset + weight.float())).to(x.dtype)
    return out if residual is None else (out, residual)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    hidden,
    eps,
    offset,
    HAS_RESIDUAL: tl.constexpr,
    GEMMA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # grid: (rows,); one program normalises one row of `hidden` elements
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounded like torch's add
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / hidden
    normed = xf * (1.0 / tl.sqrt(var + eps))
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if GEMMA:
        y = normed * (offset + w.to(tl.float32))
    else:
        y = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,  # (..., H)
    weight: torch.Tensor,  # (H,)
    eps: float,
    residual: torch.Tensor | None = None,  # (..., H)
    offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    require_triton()
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)  # (N, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_out = torch.empty_like(out)
    else:
        r2 = res_out = x2  # unused
    block = triton.next_power_of_2(hidden)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight,
            out,
            res_out,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            res_out.stride(0),
            hidden,
            eps,
            offset,
            HAS_RESIDUAL=residual is not None,
            GEMMA=offset != 0.0,
            BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
        )
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton on CUDA (or with FLAB_FORCE_TRITON=1), torch otherwise."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual, offset)
    return rms_norm_torch(x, weight, eps, residual, offset)
