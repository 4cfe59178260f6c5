"""The one attention layer every model uses: write the new K/V into the paged cache, attend over it (through the
engine's attention backend, backend/layers/attention_backends.py)."""

from __future__ import annotations

import torch
from torch import nn

from backend.core.forward_batch import ForwardBatch
from flab_kernels.attention_args import PagedAttentionArgs


def paged_attention(
    q: torch.Tensor,  # (T, Hq, D)
    k: torch.Tensor,  # (T, Hkv, D)
    v: torch.Tensor,  # (T, Hkv, Dv), Dv may differ from D (MLA)
    slot: int,
    batch: ForwardBatch,
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:  # (T, Hq, Dv)
    """Attention of one call; `slot` is its cache slot (the layer index for native models)."""
    k_cache, v_cache = batch.kv_cache.k[slot], batch.kv_cache.v[slot]
    dv = v.shape[-1]
    if k.shape[-1] < k_cache.shape[-1]:  # a slot stored at one head size for both (KVSlot.padded)
        q, k = _pad_last(q, k_cache.shape[-1]), _pad_last(k, k_cache.shape[-1])  # zeros: same q.k products
    if dv < v_cache.shape[-1]:
        v = _pad_last(v, v_cache.shape[-1])  # zero columns of the output, cut off below
    batch.attention.store(k, v, k_cache, v_cache, batch.slot_mapping)
    args = PagedAttentionArgs(
        q,
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
        batch.bidirectional,
    )
    out = batch.attention.attend(args, batch.attn_metadata)
    return out if out.shape[-1] == dv else out[..., :dv]


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:  # (..., d) -> (..., size), zeros appended
    return torch.nn.functional.pad(x, (0, size - x.shape[-1]))


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
