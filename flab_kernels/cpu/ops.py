"""The C++ CPU kernels from Python: weight packing (once, at load) and the calls, each beside its torch reference.

    pack_weight(w)                    (N, K) bf16 -> (NB, KP, 16, 2) bf16; fp32 -> (NB, K, 16) fp32  (zero padded)
    linear(ext, x, packed, bias, N)   (..., K) -> (..., N): x @ w.T + bias, fp32 accumulation
    pack_int8_weight(q), linear_int8(ext, x, packed, scales, bias, N)   weight-only int8 (per-row scales)
    pack_int4_weight(codes, scales, offsets, group, centered), linear_int4(ext, x, packed, bias, N)   int4 group-wise
      (few rows: the group-wise tile over the packed codes; many: AMX tiles, or the weight dequantized once and
      torch's GEMM)
    rms_norm(ext, x, w, eps, residual, offset)   as flab_kernels.norm.rms_norm_torch
    silu_and_mul(ext, x)              as flab_kernels.activation.silu_and_mul_torch
    rope_(ext, x, cos, sin, heads, head_dim)   in place, as backend/layers/rotary.py's torch math
    store_kv(ext, k, v, k_cache, v_cache, slots)   as flab_kernels.attention_torch.store_kv_torch
    paged_decode(ext, q, ...)         as flab_kernels.attention_torch on decode-only steps

`ext` is the loaded module (flab_kernels/cpu/build.py `cpu_kernels(cache).module`). Tolerances against the torch
references (tests/flab_kernels/test_cpu_kernels.py): fp32 results differ by summation order only; bf16 linears
by the order of fp32 sums before one rounding (at most an ulp or two of the output); norms and activations round
where transformers rounds, so bf16 results are mostly bit-equal and at most one ulp away.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Int4Packed:
    """int4 group-wise weights for `linear_int4`, g = k // group: with fp32 scales / offsets w[n, k] = code[n, k] *
    scale[n, g] + offset[n, g]; with bf16 ones (`centered`, torch's `cpu_int4pack` pairs as they are: half the
    bytes) w[n, k] = (code[n, k] - 8) * scale[n, g] + offset[n, g], the kernel taking offset - 8 * scale in fp32."""

    codes: torch.Tensor  # (NB, KP, 16) uint8: byte j of pair p holds row j's codes for k = 2p (low nibble), 2p + 1
    scales: torch.Tensor  # (NB, G, 16) fp32, or bf16 when centered
    offsets: torch.Tensor  # (NB, G, 16) fp32, or bf16 when centered
    group_size: int

    @property
    def centered(self) -> bool:
        return self.scales.dtype == torch.bfloat16

    def dequantize(self, n: int, k: int) -> torch.Tensor:  # (N, K) fp32, the kernel's weight (for tests)
        nb, kp, _ = self.codes.shape
        c = self.codes.permute(0, 2, 1).reshape(nb * BLOCK, kp)
        codes = torch.stack((c & 0xF, c >> 4), dim=-1).flatten(-2)[:n, :k].float()  # (N, K)
        cols = torch.arange(k) // self.group_size
        scales = self.scales.float().permute(0, 2, 1).reshape(nb * BLOCK, -1)[:n, cols]
        offsets = self.offsets.float().permute(0, 2, 1).reshape(nb * BLOCK, -1)[:n, cols]
        if self.centered:
            offsets = offsets - 8 * scales
        return codes * scales + offsets


def pack_int4_weight(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int, centered: bool = False
) -> Int4Packed:
    """(N, K) unsigned codes 0..15, (N, G) scales and offsets -> `Int4Packed`; N padded to 16 rows and K to whole
    groups with zero codes and zero scales / offsets (a padded column meets a zero x). `centered`: bf16 scales and
    offsets of w = (code - 8) * scale + offset, kept in bf16; else w = code * scale + offset in fp32."""
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"the int4 kernel takes an even group size, got {group_size}")
    n, k = codes.shape
    g = -(-k // group_size)
    if scales.shape != (n, g) or offsets.shape != (n, g):
        raise ValueError(f"scales and offsets must be ({n}, {g}), got {tuple(scales.shape)}, {tuple(offsets.shape)}")
    if centered and (scales.dtype != torch.bfloat16 or offsets.dtype != torch.bfloat16):
        raise TypeError(f"centered int4 scales and offsets are bf16, got {scales.dtype}, {offsets.dtype}")
    nb = -(-n // BLOCK)
    c = F.pad(codes.to(torch.uint8), (0, g * group_size - k, 0, nb * BLOCK - n))  # (NB*16, G*gs)
    pairs = c[:, 0::2] | (c[:, 1::2] << 4)  # (NB*16, KP)
    packed = pairs.view(nb, BLOCK, -1).permute(0, 2, 1).contiguous()  # (NB, KP, 16)

    def per_block(t: torch.Tensor) -> torch.Tensor:  # (N, G) -> (NB, G, 16)
        t = F.pad(t.detach() if centered else t.detach().float(), (0, 0, 0, nb * BLOCK - n))
        return t.view(nb, BLOCK, g).permute(0, 2, 1).contiguous()

    return Int4Packed(packed, per_block(scales), per_block(offsets), group_size)


def linear_int4(
    ext: ModuleType, x: torch.Tensor, w: Int4Packed, bias: torch.Tensor | None, n: int
) -> torch.Tensor:  # (..., K) -> (..., N) in x's dtype; bias fp32 (N,)
    k = x.shape[-1]
    if x.dim() == 2:
        return ext.linear_int4(x, w.codes, w.scales, w.offsets, bias, n, k, w.group_size)
    out = ext.linear_int4(x.reshape(-1, k), w.codes, w.scales, w.offsets, bias, n, k, w.group_size)
    return out.view(*x.shape[:-1], n)


def linear_int8(
    ext: ModuleType, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, n: int
) -> torch.Tensor:  # (..., K) -> (..., N): (x @ Q.T) * scales + bias; scales, bias fp32 (N,)
    k = x.shape[-1]
    return ext.linear_int8(x.reshape(-1, k), packed, scales, bias, n, k).view(*x.shape[:-1], n)


def linear_max_rows(ext: ModuleType, packed: torch.Tensor) -> int:
    """The most rows for which `linear` (an int8 packing: `linear_int8`) is the product to run on this packed weight
    here: 4 (GEMV tiles), 32 for bf16 on AVX512 (AMX tiles where they run), every row count for int8 on AVX512;
    above, oneDNN / the quantized module is faster (docs/cpu_kernels.md, csrc/tensor_ops.h)."""
    return int(ext.linear_max_rows(packed))


def linear(
    ext: ModuleType, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int
) -> torch.Tensor:  # (..., K) -> (..., N); bias fp32 (N,)
    k = x.shape[-1]
    if x.dim() == 2:  # the usual (T, K): no reshapes (each is a dispatch on every decode-step linear)
        return ext.linear(x, packed, bias, n, k)
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
    if x.dim() == 2 and x.is_contiguous() and (residual is None or residual.is_contiguous()):  # (T, H): as is
        out, res_out = ext.rms_norm(x, residual, weight, float(eps), float(offset))
        return out if residual is None else (out, res_out)
    res = None if residual is None else residual.reshape(-1, h).contiguous()
    out, res_out = ext.rms_norm(x.reshape(-1, h).contiguous(), res, weight.contiguous(), float(eps), float(offset))
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


def silu_and_mul(ext: ModuleType, x: torch.Tensor) -> torch.Tensor:  # (..., 2I) -> (..., I)
    out = ext.silu_and_mul(x.reshape(-1, x.shape[-1]).contiguous())  # (T, I)
    return out.view(*x.shape[:-1], x.shape[-1] // 2)


def rope_(
    ext: ModuleType,
    x: torch.Tensor,  # (T, >= heads * D) rows with unit column stride (e.g. the q | k columns of a qkv output)
    cos: torch.Tensor,  # (T, 1, rd) [cos | cos] in x's dtype (rotary.py rope_step)
    sin: torch.Tensor,  # (T, 1, rd) [-sin | sin]
    heads: int,
    head_dim: int,
) -> None:
    """Rotate the first rd dims of each of `heads` heads in place: x * cos + rotate_half(x) * sin, each product and
    the sum rounded to x's dtype (HF's expression; fp32 bit for bit)."""
    ext.rope(x, cos, sin, heads, head_dim)


def store_kv(
    ext: ModuleType,
    k: torch.Tensor,  # (T, Hkv * D) rows, the caches' dtype
    v: torch.Tensor,  # (T, Hkv * Dv)
    k_cache: torch.Tensor,  # (NB, BS, Hkv, D)
    v_cache: torch.Tensor,  # (NB, BS, Hkv, Dv)
    slots: torch.Tensor,  # (T,) int64
) -> None:
    ext.store_kv(k, v, k_cache, v_cache, slots)


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
