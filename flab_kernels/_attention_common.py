"""Small helpers shared by the two Triton attention kernels (unified and split-KV decode)."""

from __future__ import annotations

import torch


def check_attention_args(
    q: torch.Tensor,  # (T, Hq, D)
    k_cache: torch.Tensor,  # (NB, BS, Hkv, D)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (S, MB)
    sinks: torch.Tensor | None,  # (Hq,)
    softcap: float | None,
    sliding_window: int | None,
) -> None:
    """Raise ValueError for inputs the Triton attention kernels do not support."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"q must be (T, Hq, D) and the caches (NB, BS, Hkv, D); got {tuple(q.shape)}, {tuple(k_cache.shape)}"
        )
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    if q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"head_dim of q ({q.shape[-1]}) and cache ({k_cache.shape[-1]}) differ")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"num q heads ({q.shape[1]}) must be a multiple of num kv heads ({k_cache.shape[2]})")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("q and the caches must be contiguous in head_dim")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables must be contiguous in its last dimension")
    if sinks is not None and (sinks.dim() != 1 or sinks.stride(0) != 1):
        raise ValueError("sinks must be a contiguous 1-D tensor")
    if sinks is not None and sinks.numel() != q.shape[1]:
        raise ValueError(f"sinks must have one value per q head ({q.shape[1]}), got {sinks.numel()}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be > 0, got {sliding_window}")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact ("ieee") products so fp32 engines match the torch path; 16-bit use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"
