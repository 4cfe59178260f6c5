"""The C++ CPU kernels from Python: weight packing (once, at load) and the calls, each beside its torch reference.

    pack_weight(w)                    (N, K) bf16 -> (NB, KP, 16, 2) bf16; fp32 -> (NB, K, 16) fp32  (zero padded)
    linear(ext, x, packed, bias, N)   (..., K) -> (..., N): x @ w.T + bias, fp32 accumulation
    pack_int8_weight(q), linear_int8(ext, x, packed, scales, bias, N)   weight-only int8 (per-row scales)
    rms_norm(ext, x, w, eps, residual, offset)   as flab_kernels.norm.rms_norm_torch
    silu_and_mul(ext, x)              as flab_kernels.activation.silu_and_mul_torch

`ext` is the loaded module (flab_kernels/cpu/build.py `cpu_kernels(cache).module`). Tolerances against the torch
references (tests/flab_kernels/test_cpu_kernels.py): fp32 results differ by summation order only; bf16 linears
by the order of fp32 sums before one rounding (at most an ulp or two of the output); norms and activations round
where transformers rounds, so bf16 results are mostly bit-equal and at most one ulp away.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

BLOCK = 16  # output rows per packed block (csrc/gemv.h kBlock)
PACKED_DTYPES = (torch.bfloat16, torch.float32)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) bf16 -> (NB, KP, 16, 2) with K in (even, odd) pairs; (N, K) fp32 -> (NB, K, 16); rows and K padded
    with zeros."""
    if weight.dtype not in PACKED_DTYPES:
        raise TypeError(f"the CPU kernels pack bf16 or fp32 weights, got {weight.dtype}")
    n, k = weight.shape
    nb = -(-n // BLOCK)
    if weight.dtype == torch.bfloat16:
        kp = -(-k // 2)
        w = F.pad(weight.detach(), (0, 2 * kp - k, 0, nb * BLOCK - n))  # (NB*16, 2*KP)
        return w.view(nb, BLOCK, kp, 2).permute(0, 2, 1, 3).contiguous()
    w = F.pad(weight.detach(), (0, 0, 0, nb * BLOCK - n))  # (NB*16, K)
    return w.view(nb, BLOCK, k).permute(0, 2, 1).contiguous()


def unpack_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The plain (N, K) weight back from `pack_weight` (for introspection and tests)."""
    if packed.dim() == 4:
        nb, kp = packed.shape[:2]
        return packed.permute(0, 2, 1, 3).reshape(nb * BLOCK, 2 * kp)[:n, :k]
    nb = packed.shape[0]
    return packed.permute(0, 2, 1).reshape(nb * BLOCK, k)[:n]


def pack_int8_weight(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 codes -> (NB, K, 16), rows padded with zeros."""
    n, k = q.shape
    nb = -(-n // BLOCK)
    w = F.pad(q.detach(), (0, 0, 0, nb * BLOCK - n))  # (NB*16, K)
    return w.view(nb, BLOCK, k).permute(0, 2, 1).contiguous()


def linear_int8(
    ext: ModuleType, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, n: int
) -> torch.Tensor:  # (..., K) -> (..., N): (x @ Q.T) * scales + bias; scales, bias fp32 (N,)
    k = x.shape[-1]
    return ext.linear_int8(x.reshape(-1, k), packed, scales, bias, n, k).view(*x.shape[:-1], n)


def linear(
    ext: ModuleType, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int
) -> torch.Tensor:  # (..., K) -> (..., N); bias fp32 (N,)
    k = x.shape[-1]
    out = ext.linear(x.reshape(-1, k), packed, bias, n, k)  # (M, N)
    return out.view(*x.shape[:-1], n)


def rms_norm(
    ext: ModuleType,
    x: torch.Tensor,  # (..., H)
    weight: torch.Tensor,  # (H,)
    eps: float,
    residual: torch.Tensor | None = None,  # (..., H)
    offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) or, with `residual`, (norm(x + residual), x + residual)."""
    h = x.shape[-1]
    res = None if residual is None else residual.reshape(-1, h).contiguous()
    out, res_out = ext.rms_norm(x.reshape(-1, h).contiguous(), res, weight.contiguous(), float(eps), float(offset))
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


def silu_and_mul(ext: ModuleType, x: torch.Tensor) -> torch.Tensor:  # (..., 2I) -> (..., I)
    out = ext.silu_and_mul(x.reshape(-1, x.shape[-1]).contiguous())  # (T, I)
    return out.view(*x.shape[:-1], x.shape[-1] // 2)


def paged_decode(
    ext: ModuleType,
    q: torch.Tensor,  # (S, Hq, D): one new token per sequence
    k_cache: torch.Tensor,  # (NB, BS, Hkv, D)
    v_cache: torch.Tensor,  # (NB, BS, Hkv, Dv)
    block_tables: torch.Tensor,  # (S, MB) int32
    seq_lens: torch.Tensor,  # (S,) int32, the new token included (already stored)
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,  # (Hq,)
) -> torch.Tensor:  # (S, Hq, Dv)
    """Decode attention reading the K/V blocks in place, threads split by sequence and KV head; the semantics of
    flab_kernels.attention_torch (sliding window over the last W tokens, softcap, sinks as an extra logit)."""
    if q.stride(-1) != 1 or q.stride(1) != q.shape[-1]:
        q = q.contiguous()
    return ext.paged_decode(
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        float(scale),
        float(softcap or 0.0),
        int(sliding_window or 0),
        None if sinks is None else sinks.float().contiguous(),
    )
