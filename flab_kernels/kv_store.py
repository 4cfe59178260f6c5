"""Write the new tokens' K/V into the paged cache through slot_mapping (Triton; torch reference in attention_torch)."""

from __future__ import annotations

import torch

from flab_kernels._triton import require_triton, tl, triton


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,  # cache strides: block, slot-in-block, head (head_dim is contiguous)
    block_size,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (T, Hkv); one program copies one head of one token into both caches
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padded token: nothing to write (vLLM convention)
        return
    blk = slot // block_size
    off = slot % block_size
    d = tl.arange(0, BLOCK_D)
    mask = d < HEAD_DIM
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = blk * stride_cb + off * stride_cs + h * stride_ch + d
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    k_cache: torch.Tensor,  # (NB, BS, Hkv, D)
    v_cache: torch.Tensor,  # (NB, BS, Hkv, D)
    slot_mapping: torch.Tensor,  # (T,) int64; negative slots are skipped
) -> None:
    """Write the new tokens' K/V into their slots (same contract as `store_kv_torch`)."""
    require_triton()
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share strides and have a contiguous head_dim")
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    _store_kv_kernel[(num_tokens, num_heads)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
