"""Triton dequantize-in-kernel matmul for weight-only quantized linear layers (W8A16, W4A16, FP8 weight-only).

y = x @ W.T (+ bias) where W is decoded tile by tile from the encoding described in
flab_kernels/quant_torch.py (the reference this kernel is tested against):

    MODE 0 int8 : qweight int8 (N, K)                  W = (q - z) * s
    MODE 1 int4 : qweight uint8 (N, ceil(K/2)) nibbles W = (nibble - 8 - z) * s
    MODE 2 fp8  : qweight uint8 (N, K) e4m3fn bits     W = fp8(q) * s   (decoded with integer ops, any GPU)

Scales/zeros are (N, G) with g = k // group_size. A K tile never straddles two groups: BLOCK_K divides
group_size (or G == 1), so each tile loads one (BLOCK_N,) column of scales. The product runs in the
activation dtype (fp16/bf16; fp32 with ieee precision) and accumulates in fp32.
"""

from __future__ import annotations

import torch

from flab_kernels._triton import require_triton, tl, triton

MODES = {"int8": 0, "int4": 1, "fp8": 2}


@triton.jit
def _decode_fp8_e4m3(b):
    """uint8 bits of float8_e4m3fn -> float32, with integer ops only (no fp8 hardware needed)."""
    b = b.to(tl.int32)
    sign = (b >> 7) & 1
    exp = (b >> 3) & 0xF
    man = b & 0x7
    normal_bits = (sign << 31) | ((exp + 120) << 23) | (man << 20)
    normal = normal_bits.to(tl.float32, bitcast=True)
    subnormal = man.to(tl.float32) * 0.001953125  # man * 2**-9
    subnormal = tl.where(sign == 1, -subnormal, subnormal)
    return tl.where(exp == 0, subnormal, normal)


@triton.jit
def _quant_matmul_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_xk,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_ym,
    stride_yn,
    MODE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rk = tl.arange(0, BLOCK_K)  # (BK,)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )  # (BM, BK)
        w_mask = k_mask[:, None] & n_mask[None, :]
        if MODE == 1:
            byte = tl.load(q_ptr + rn[None, :] * stride_qn + (kk // 2)[:, None] * stride_qk, mask=w_mask, other=0)
            shift = ((kk % 2) * 4)[:, None]
            w = ((byte.to(tl.int32) >> shift) & 0xF).to(tl.float32) - 8.0  # (BK, BN)
        elif MODE == 2:
            byte = tl.load(q_ptr + rn[None, :] * stride_qn + kk[:, None] * stride_qk, mask=w_mask, other=0)
            w = _decode_fp8_e4m3(byte)
        else:
            w = tl.load(q_ptr + rn[None, :] * stride_qn + kk[:, None] * stride_qk, mask=w_mask, other=0).to(tl.float32)
        g = k0 // group_size
        s = tl.load(s_ptr + rn * stride_sn + g * stride_sg, mask=n_mask, other=0.0).to(tl.float32)  # (BN,)
        if HAS_ZERO:
            z = tl.load(z_ptr + rn * stride_sn + g * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
            w = w - z[None, :]
        w = (w * s[None, :]).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def block_k_for(group_size: int, num_groups: int) -> int | None:
    """The K tile: 64/32/16 dividing group_size (any when there is one group); None = unsupported."""
    for bk in (64, 32, 16):
        if num_groups == 1 or group_size % bk == 0:
            return bk
    return None


def quant_matmul_triton(
    x: torch.Tensor,  # (M, K) fp16 / bf16 / fp32
    qweight: torch.Tensor,
    scales: torch.Tensor,  # (N, G)
    zeros: torch.Tensor | None,  # (N, G)
    group_size: int,
    mode: str,
    bias: torch.Tensor | None = None,  # (N,)
) -> torch.Tensor:  # (M, N) in x.dtype
    require_triton()
    m, k = x.shape
    n, num_groups = scales.shape
    block_k = block_k_for(group_size, num_groups)
    if block_k is None:
        raise ValueError(f"group size {group_size} is not a multiple of 16: use the torch path")
    scales = scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    if qweight.dtype == torch.float8_e4m3fn:
        qweight = qweight.view(torch.uint8)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    z = zeros if zeros is not None else scales
    b = bias if bias is not None else scales
    _quant_matmul_kernel[grid](
        x,
        qweight,
        scales,
        z,
        b,
        y,
        m,
        n,
        k,
        group_size if num_groups > 1 else max(k, 1),
        x.stride(0),
        x.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        scales.stride(0),
        scales.stride(1),
        y.stride(0),
        y.stride(1),
        MODE=MODES[mode],
        HAS_ZERO=zeros is not None,
        HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return y
