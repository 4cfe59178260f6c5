"""Rotary position embedding on q and k from positions and a cos/sin cache: torch reference, Triton, dispatch.

Cache layout (as in vLLM): `cos_sin_cache[max_position, rotary_dim]` = [cos | sin], each half
`rotary_dim // 2` wide; `rotary_dim <= head_dim` (partial rotary: only the first rotary_dim
channels of each head rotate, the rest pass through).
  neox style (rotate halves, Llama/HF `rotate_half`): pairs (x[i], x[i + rd/2])
  gpt-j style (interleaved):                          pairs (x[2i], x[2i + 1])
Both rotate a pair (a, b) by the angle of frequency i: (a cos - b sin, b cos + a sin).
The math runs in fp32 and rounds once; HF rounds cos/sin to the model dtype first, so 16-bit
results can differ from HF by about one ulp.
"""

from __future__ import annotations

import torch

from flab_kernels._triton import require_triton, tl, triton
from flab_kernels.dispatch import use_triton


def rope_inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:  # (rd/2,)
    """Default (unscaled) RoPE inverse frequencies."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def cos_sin_cache_from_inv_freq(
    inv_freq: torch.Tensor,  # (rd/2,) e.g. a HF rotary module's `inv_freq` (any rope scaling already applied)
    max_position: int,
    attention_scaling: float = 1.0,  # HF's `attention_scaling` (yarn/longrope); 1.0 otherwise
) -> torch.Tensor:  # (P, rd) fp32
    t = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())  # (P, rd/2)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_scaling


def _rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool, out: torch.Tensor) -> None:
    # x, out: (T, H, D); cos, sin: (T, 1, rd/2) fp32
    half = cos.shape[-1]
    rot = x[..., : 2 * half].float()
    if is_neox:
        a, b = rot[..., :half], rot[..., half:]
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
    oa, ob = a * cos - b * sin, b * cos + a * sin
    res = torch.cat([oa, ob], -1) if is_neox else torch.stack([oa, ob], -1).flatten(-2)  # (T, H, rd)
    if out.data_ptr() != x.data_ptr():
        out[..., 2 * half :] = x[..., 2 * half :]
    out[..., : 2 * half] = res.to(out.dtype)


def _as_heads(x: torch.Tensor, head_dim: int | None) -> torch.Tensor:  # (T, H, D)
    if x.dim() == 3:
        return x
    if head_dim is None:
        raise ValueError("2-D q/k need head_dim")
    return x.view(x.shape[0], -1, head_dim)


def apply_rotary_torch(
    q: torch.Tensor,  # (T, Hq, D) or (T, Hq * D) with head_dim
    k: torch.Tensor | None,  # (T, Hkv, D) or (T, Hkv * D)
    positions: torch.Tensor,  # (T,) int
    cos_sin_cache: torch.Tensor,  # (P, rd)
    is_neox: bool = True,
    inplace: bool = False,
    head_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q and k (k may be None); returns (q_out, k_out) with the input shapes."""
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache[positions].float()  # (T, rd)
    cos, sin = cs[:, None, :half], cs[:, None, half:]  # (T, 1, rd/2)
    outs: list[torch.Tensor | None] = []
    for x in (q, k):
        if x is None:
            outs.append(None)
            continue
        out = x if inplace else torch.empty_like(x)
        _rotate_torch(_as_heads(x, head_dim), cos, sin, is_neox, _as_heads(out, head_dim))
        outs.append(out)
    return outs[0], outs[1]


@triton.jit
def _rotary_kernel(
    x_ptr,
    out_ptr,
    pos_ptr,
    cache_ptr,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    stride_cache,
    num_heads,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # rotary_dim // 2
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    IS_NEOX: tl.constexpr,
    COPY_TAIL: tl.constexpr,  # out-of-place with rotary_dim < head_dim: copy the pass-through channels
    BLOCK_TAIL: tl.constexpr,
):
    # grid: (T,); one program rotates all heads of one token
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_valid = i < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + i, mask=i_valid, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + i, mask=i_valid, other=0.0).to(tl.float32)[None, :]
    h = tl.arange(0, BLOCK_H)
    mask = (h < num_heads)[:, None] & i_valid[None, :]  # (H, half)
    if IS_NEOX:
        ia = i
        ib = i + HALF
    else:
        ia = 2 * i
        ib = 2 * i + 1
    x_row = x_ptr + t * stride_xt + h[:, None] * stride_xh
    o_row = out_ptr + t * stride_ot + h[:, None] * stride_oh
    a = tl.load(x_row + ia[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_row + ib[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(o_row + ia[None, :], (a * cos - b * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + ib[None, :], (b * cos + a * sin).to(out_ptr.dtype.element_ty), mask=mask)
    if COPY_TAIL:
        j = 2 * HALF + tl.arange(0, BLOCK_TAIL)
        tail_mask = (h < num_heads)[:, None] & (j < HEAD_DIM)[None, :]
        tl.store(o_row + j[None, :], tl.load(x_row + j[None, :], mask=tail_mask), mask=tail_mask)


def _rotary_launch(
    x: torch.Tensor, out: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, is_neox: bool
) -> None:
    # x, out: (T, H, D)
    num_tokens, num_heads, head_dim = x.shape
    half = cache.shape[-1] // 2
    if num_tokens == 0:
        return
    copy_tail = out.data_ptr() != x.data_ptr() and 2 * half < head_dim
    _rotary_kernel[(num_tokens,)](
        x,
        out,
        positions,
        cache,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        cache.stride(0),
        num_heads,
        HEAD_DIM=head_dim,
        HALF=half,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        IS_NEOX=is_neox,
        COPY_TAIL=copy_tail,
        BLOCK_TAIL=triton.next_power_of_2(max(head_dim - 2 * half, 1)),
    )


def apply_rotary_triton(
    q: torch.Tensor,
    k: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    inplace: bool = False,
    head_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `apply_rotary_torch`; q/k may be strided views (head_dim must be contiguous)."""
    require_triton()
    if cos_sin_cache.shape[-1] % 2 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("cos_sin_cache must be (P, rotary_dim) with an even, contiguous rotary_dim")
    outs: list[torch.Tensor | None] = []
    for x in (q, k):
        if x is None:
            outs.append(None)
            continue
        if x.stride(-1) != 1:
            raise ValueError("q/k must be contiguous in the last dimension")
        out = x if inplace else torch.empty_like(x)
        x3, out3 = _as_heads(x, head_dim), _as_heads(out, head_dim)
        if cos_sin_cache.shape[-1] > x3.shape[-1]:
            raise ValueError(f"rotary_dim {cos_sin_cache.shape[-1]} > head_dim {x3.shape[-1]}")
        _rotary_launch(x3, out3, positions, cos_sin_cache, is_neox)
        outs.append(out)
    return outs[0], outs[1]


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    inplace: bool = False,
    head_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton on CUDA (or with FLAB_FORCE_TRITON=1), torch otherwise."""
    fn = apply_rotary_triton if use_triton(q) else apply_rotary_torch
    return fn(q, k, positions, cos_sin_cache, is_neox, inplace, head_dim)
