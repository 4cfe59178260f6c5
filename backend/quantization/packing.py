"""Bit packing of integer codes into int32 words, as checkpoint formats store them.

A word holds 32 // bits codes; the code at position i of a run of 32 // bits consecutive elements along
`dim` goes to bits [i * bits, (i + 1) * bits) of the word, unless `order` is given: then bits
[i * bits, ...) hold element `order[i]` of the run (AWQ's GEMM layout uses AWQ_ORDER).
    GPTQ qweight: along K (dim 0 of (K, N)); GPTQ qzeros: along N; sequential order.
    AWQ qweight / qzeros: along N (dim 1 of (K, N) / (G, N)), AWQ_ORDER.
    compressed-tensors pack-quantized: weight along K (dim 1 of (N, K)), zero points along N (dim 0);
        sequential (its dense packing is exactly this for 4 and 8 bits); a partial last word is zero-padded.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _inverse(order: tuple[int, ...]) -> list[int]:
    inv = [0] * len(order)
    for i, j in enumerate(order):
        inv[j] = i
    return inv


def pack_int32(codes: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unsigned codes (< 2**bits) -> int32 words along `dim` (length padded up to a whole word with zeros)."""
    per = 32 // bits
    c = codes.movedim(dim, -1).to(torch.int64)  # (..., L)
    pad = -c.shape[-1] % per
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per)  # (..., W, per)
    if order is not None:
        c = c[..., list(order)]
    shifts = torch.arange(per, device=c.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # (..., W) in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(
    words: torch.Tensor, bits: int, dim: int, length: int | None = None, order: tuple[int, ...] | None = None
) -> torch.Tensor:
    """int32 words -> unsigned codes (int32) along `dim`, truncated to `length` when given."""
    per = 32 // bits
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF  # (..., W)
    shifts = torch.arange(per, device=w.device, dtype=torch.int64) * bits
    c = (w[..., None] >> shifts) & (2**bits - 1)  # (..., W, per)
    if order is not None:
        c = c[..., _inverse(order)]
    c = c.reshape(*c.shape[:-2], -1)
    if length is not None:
        c = c[..., :length]
    return c.to(torch.int32).movedim(-1, dim)
