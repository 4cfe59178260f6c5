"""Attention backends: how the one paged attention layer stores K/V and attends, by name.

A backend does two things: `prepare` the step's metadata once (before the forward; every layer reads it
from the ForwardBatch) and, per layer call, `store` the new K/V into the paged cache and `attend` over it.
The engine chooses one backend when it starts (`make_attention_backend`: "auto" is triton on CUDA, torch
elsewhere) and every step uses it.

    torch   the CPU path and the reference: a per-step plan of block gathers (flab_kernels/attention_torch.py)
    triton  the CUDA kernels (flab_kernels/kv_store.py, flab_kernels/paged_attention.py, flab_kernels/paged_decode.py)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from flab_kernels.attention_torch import build_plan, paged_attention_planned, store_kv_torch

if TYPE_CHECKING:
    from backend.forward_batch import ForwardBatch


class AttentionBackend:
    name: ClassVar[str]
    pads_head_dims: ClassVar[bool] = False  # K and V stored at one (padded) head size per cache slot

    def __init__(self, compute_dtype: torch.dtype | None = None) -> None:
        self.compute_dtype = compute_dtype  # the attention math dtype (None = the model's)

    def prepare(
        self, query_start_loc: list[int], seq_lens: list[int], block_tables: torch.Tensor, block_size: int
    ) -> object | None:
        """The step's backend-specific metadata (stored as ForwardBatch.attn_metadata)."""
        return None

    def store(self, k: torch.Tensor, v: torch.Tensor, k_cache, v_cache, batch: ForwardBatch) -> None:
        raise NotImplementedError  # pragma: no cover - every registered backend implements it

    def attend(
        self, q, k_cache, v_cache, batch: ForwardBatch, scale: float, softcap, sliding_window, sinks
    ) -> torch.Tensor:  # (T, Hq, Dv)
        raise NotImplementedError  # pragma: no cover - every registered backend implements it


class TorchAttention(AttentionBackend):
    name = "torch"

    def prepare(self, query_start_loc, seq_lens, block_tables, block_size):
        return build_plan(query_start_loc, seq_lens, block_tables, block_size, self.compute_dtype)

    def store(self, k, v, k_cache, v_cache, batch):
        store_kv_torch(k, v, k_cache, v_cache, batch.slot_mapping)

    def attend(self, q, k_cache, v_cache, batch, scale, softcap, sliding_window, sinks):
        return paged_attention_planned(q, k_cache, v_cache, batch.attn_metadata, scale, softcap, sliding_window, sinks)


class TritonAttention(AttentionBackend):
    name = "triton"
    pads_head_dims = True

    def store(self, k, v, k_cache, v_cache, batch):
        from flab_kernels.kv_store import store_kv_triton

        store_kv_triton(k, v, k_cache, v_cache, batch.slot_mapping)

    def attend(self, q, k_cache, v_cache, batch, scale, softcap, sliding_window, sinks):
        from flab_kernels.ops import paged_attention_triton_auto

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


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {b.name: b for b in (TorchAttention, TritonAttention)}


def resolve_attention_backend(requested: str, device: torch.device) -> str:
    """ "auto" -> triton on CUDA, torch elsewhere; a registered name as it is."""
    if requested == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return requested


def make_attention_backend(requested: str, device: torch.device, compute_dtype=None) -> AttentionBackend:
    return ATTENTION_BACKENDS[resolve_attention_backend(requested, device)](compute_dtype)
