"""Weight-only quantized matmuls in plain torch: the reference for the Triton kernels and the CPU path.

One weight encoding is shared by every quantized linear layer after `finalize()` (see
backend/quantization/intquant.py and fp8.py), with G = ceil(K / group_size) groups along K:

    mode "int8": qweight int8 (N, K)                W[n, k] = (q[n, k] - z[n, g]) * s[n, g]
    mode "int4": qweight uint8 (N, ceil(K/2))       nibbles: low = even k, high = odd k, q = nibble - 8
    mode "fp8" : qweight uint8 (N, K)               the float8_e4m3fn bits; W[n, k] = fp8(q) * s[n, g]

    scales s (N, G), zeros z (N, G) or None (= 0), both float; g = k // group_size.

Integer values are stored centered (int8: q - 128 of the unsigned code, int4: code - 8), so symmetric
weights have no zero points and the centered zero of an asymmetric code is z = zero_code - 2**(bits-1).

The CPU fast paths of torch (checked on torch 2.13 CPU, fp32 / bf16 / fp16 activations all work):
    torch._weight_int8pack_mm(x (M, K), w int8 (N, K), scales (N,) in x.dtype)    symmetric per-channel
    torch._weight_int4pack_mm_for_cpu(x (M, K), packed, group_size, scales_and_zeros (G, N, 2) x.dtype)
        with packed = torch._convert_weight_to_int4pack_for_cpu(codes int32 (N, K) in 0..15, 1), a blocked
        layout (N, K/2) uint8; W[n, k] = (code - 8) * scale[g, n] + zero[g, n] (zero is a float offset).
        Needs N % 16 == 0, group_size in {32, 64, 128, 256}, K % group_size == 0.
"""

from __future__ import annotations

import functools

import torch

INT4_PACK_GROUP_SIZES = (32, 64, 128, 256)


def int4_codes(qweight: torch.Tensor, k: int) -> torch.Tensor:  # (N, ceil(K/2)) uint8 -> (N, K) uint8 codes 0..15
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).flatten(-2)[:, :k]


def pack_int4_nibbles(q: torch.Tensor) -> torch.Tensor:  # (N, K) centered int (-8..7) -> (N, ceil(K/2)) uint8
    codes = (q.to(torch.int16) + 8).to(torch.uint8)
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1), value=8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


@functools.cache
def _fp8_table() -> torch.Tensor:  # (256,) float32: the value of every float8_e4m3fn bit pattern
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def fp8_bits_to_float(qweight: torch.Tensor) -> torch.Tensor:  # uint8 bits (any shape) -> float32 values
    """float8_e4m3fn bits to float32. On CPU through a 256-entry table (torch's own conversion of every code, so
    bit for bit the same, NaN included): torch's element-wise fp8 conversion is scalar code there, and the table
    lookup is 2.3x faster (3072 x 576: 1.9 against 4.4 ms), which is most of an fp8 linear's time on CPU."""
    if qweight.device.type != "cpu":
        return qweight.view(torch.float8_e4m3fn).float()
    return _fp8_table().index_select(0, qweight.reshape(-1).int()).view(qweight.shape)


def dequantize_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,  # (N, G)
    zeros: torch.Tensor | None,  # (N, G)
    group_size: int,
    mode: str,
    in_features: int,
    g_idx: torch.Tensor | None = None,  # (K,) group of each input column, overrides k // group_size
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # (N, K) in dtype
    """The weight as the kernels see it.

    Integer modes compute in `dtype` directly: (q - z) is a small exact integer and the product with the
    scale (a `dtype` value) is rounded once, which gives the same bits as computing in float32 and casting.
    fp8 (float32 scales) is computed in float32 and then cast.
    """
    k = in_features
    compute = torch.float32 if mode == "fp8" else dtype
    if mode == "int8":
        q = qweight.to(compute)
    elif mode == "int4":
        q = int4_codes(qweight, k).to(compute) - 8
    elif mode == "fp8":
        q = fp8_bits_to_float(qweight)
    else:
        raise ValueError(f"unknown quantized weight mode {mode!r}")
    n, g = scales.shape
    s, z = scales.to(compute), zeros.to(compute) if zeros is not None else None
    if g_idx is None and g * group_size == k:  # contiguous full groups: broadcast over a (N, G, gs) view
        q = q.view(n, g, group_size)
        if z is not None:
            q = q - z[:, :, None]
        return (q * s[:, :, None]).view(n, k).to(dtype)
    groups = g_idx.long() if g_idx is not None else torch.arange(k, device=q.device) // group_size  # (K,)
    if z is not None:
        q = q - z[:, groups]
    return (q * s[:, groups]).to(dtype)


def quant_matmul_torch(
    x: torch.Tensor,  # (M, K)
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    mode: str,
    bias: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:  # (M, N) in x.dtype
    """Reference: dequantize in the activation dtype, then one matmul."""
    w = dequantize_weight(qweight, scales, zeros, group_size, mode, x.shape[-1], g_idx, x.dtype)  # (N, K)
    return torch.nn.functional.linear(x, w, bias)


def int8pack_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """CPU fast path, symmetric per-channel int8: x (M, K), qweight int8 (N, K), scales (N,) x.dtype."""
    y = torch._weight_int8pack_mm(x.contiguous(), qweight, scales)  # (M, N)
    return y + bias if bias is not None else y


def int4pack_weight(q: torch.Tensor) -> torch.Tensor:  # (N, K) centered int4 -> torch's CPU blocked layout
    return torch._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)


def int4pack_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """(N, G) scales and centered zeros -> (G, N, 2) for torch's kernel: (q - z) * s = q * s + (-z * s)."""
    offset = -zeros.float() * scales.float() if zeros is not None else torch.zeros_like(scales, dtype=torch.float32)
    return torch.stack((scales.float(), offset), dim=-1).transpose(0, 1).contiguous().to(scales.dtype)  # (G, N, 2)


def int4pack_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    group_size: int,
    scales_and_zeros: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    y = torch._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, scales_and_zeros)  # (M, N)
    return y + bias if bias is not None else y


def int4pack_eligible(out_features: int, in_features: int, group_size: int) -> bool:
    return out_features % 16 == 0 and group_size in INT4_PACK_GROUP_SIZES and in_features % group_size == 0
