"""The one attention layer every model uses: write the new K/V into the paged cache, attend over it."""

from __future__ import annotations

import torch
from torch import nn

from backend.forward_batch import ForwardBatch
from kernels.attention_torch import paged_attention_planned, store_kv_torch


def paged_attention(
    q: torch.Tensor,  # (T, Hq, D)
    k: torch.Tensor,  # (T, Hkv, D)
    v: torch.Tensor,  # (T, Hkv, D)
    layer_idx: int,
    batch: ForwardBatch,
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:  # (T, Hq, D)
    k_cache, v_cache = batch.kv_cache.k[layer_idx], batch.kv_cache.v[layer_idx]
    if batch.backend == "triton":
        from kernels.kv_store import store_kv_triton
        from kernels.ops import paged_attention_triton_auto

        store_kv_triton(k, v, k_cache, v_cache, batch.slot_mapping)
        return paged_attention_triton_auto(
            q.contiguous(),
            k_cache,
            v_cache,
            batch.query_start_loc,
            batch.seq_lens,
            batch.block_tables,
            scale,
            softcap,
            sliding_window,
            sinks,
            batch.max_query_len,
            batch.max_seq_len,
        )
    store_kv_torch(k, v, k_cache, v_cache, batch.slot_mapping)
    return paged_attention_planned(q, k_cache, v_cache, batch.plan, scale, softcap, sliding_window, sinks)


class PagedAttention(nn.Module):
    """Module form for native models: holds the head layout and the per-layer options."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        scale: float | None = None,
        softcap: float | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.scale = scale if scale is not None else head_dim**-0.5
        self.softcap = softcap
        self.sliding_window = sliding_window

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, sinks: torch.Tensor | None = None
    ) -> torch.Tensor:
        # q: (T, Hq * D), k/v: (T, Hkv * D) -> (T, Hq * D)
        t = q.shape[0]
        out = paged_attention(
            q.view(t, self.num_heads, self.head_dim),
            k.view(t, self.num_kv_heads, self.head_dim),
            v.view(t, self.num_kv_heads, self.head_dim),
            self.layer_idx,
            batch,
            self.scale,
            self.softcap,
            self.sliding_window,
            sinks,
        )
        return out.reshape(t, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"layer={self.layer_idx}, softcap={self.softcap}, window={self.sliding_window}"
        )
