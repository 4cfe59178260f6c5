"""Triton KV store against store_kv_torch."""

from __future__ import annotations

import pytest
import torch

from flab_kernels.attention_torch import store_kv_torch
from flab_kernels.kv_store import store_kv_triton


def _caches(num_blocks, block_size, heads, head_dim, dtype):
    k = torch.randn(num_blocks, block_size, heads, head_dim).to(dtype)
    return k, torch.randn_like(k)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,head_dim", [(1, 16), (4, 80)])
@pytest.mark.parametrize(
    "dtype,cache_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float16)],
)  # cast on store
@pytest.mark.usefixtures("kernel_device")  # CUDA where there is a GPU (conftest.py)
def test_store_matches_reference(block_size, heads, head_dim, dtype, cache_dtype):
    t = 11
    key = torch.randn(t, heads, head_dim).to(dtype)
    value = torch.randn(t, heads, head_dim).to(dtype)
    slots = torch.randperm(4 * block_size)[:t].long()  # scattered, crossing blocks
    k_ref, v_ref = _caches(4, block_size, heads, head_dim, cache_dtype)
    k_tri, v_tri = k_ref.clone(), v_ref.clone()
    store_kv_torch(key, value, k_ref, v_ref, slots)
    store_kv_triton(key, value, k_tri, v_tri, slots)
    assert torch.equal(k_tri, k_ref) and torch.equal(v_tri, v_ref)  # a copy (and cast): exact


@pytest.mark.usefixtures("kernel_device")  # CUDA where there is a GPU (conftest.py)
def test_strided_views_and_padding_slots():
    t, h, d, bs = 5, 2, 16, 16
    kv = torch.randn(t, 2 * h * d)
    key, value = kv[:, : h * d].view(t, h, d), kv[:, h * d :].view(t, h, d)  # views of a fused projection
    slots = torch.tensor([3, -1, 17, 40, -1])  # -1: padded token, skipped
    k_ref, v_ref = _caches(3, bs, h, d, torch.float32)
    k_tri, v_tri = k_ref.clone(), v_ref.clone()
    keep = slots >= 0
    store_kv_torch(key[keep], value[keep], k_ref, v_ref, slots[keep])
    store_kv_triton(key, value, k_tri, v_tri, slots)
    assert torch.equal(k_tri, k_ref) and torch.equal(v_tri, v_ref)
