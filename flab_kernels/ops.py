"""The kernel entry points, each dispatched by the one rule of flab_kernels/dispatch.py (inside an engine: the
kernels its attention backend chose; outside: Triton on CUDA tensors or with FLAB_FORCE_TRITON=1, torch otherwise).

    rms_norm, apply_rotary, silu_and_mul, gelu_and_mul     dispatched here (the layers' fused kernels)
    paged_attention_triton                                 the triton attention backend's attention

Paged attention is no op of its own: the engine's attention backend (backend/layers/attention_backends.py) calls
the torch plan or `paged_attention_triton`, which chooses between the unified kernel and split-KV decode with
`choose_attention_kernel`; the setting `attention_kernel` (env FLAB_ATTENTION_KERNEL=unified|split_kv|auto)
overrides it. Triton is imported only by the kernel modules, through `flab_kernels._triton`'s guarded import, so
this module imports (and serves the torch paths) without Triton.
"""

from __future__ import annotations

import torch

from flab_kernels.activation import gelu_and_mul, silu_and_mul
from flab_kernels.attention_args import PagedAttentionArgs
from flab_kernels.attention_choice import SPLIT_KV, UNIFIED, KernelChoice, KernelChoiceConfig, choose_attention_kernel
from flab_kernels.dispatch import current
from flab_kernels.norm import rms_norm
from flab_kernels.rotary import apply_rotary

__all__ = [
    "paged_attention_triton",
    "rms_norm",
    "apply_rotary",
    "silu_and_mul",
    "gelu_and_mul",
    "attention_kernel_for",
]


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter runs (FLAB_FORCE_TRITON on CPU): pretend an H100-sized GPU


def attention_kernel_for(
    num_seqs: int,
    num_tokens: int,
    num_kv_heads: int,
    max_seq_len: int,
    device: torch.device,
    max_query_len: int | None = None,
    config: KernelChoiceConfig = KernelChoiceConfig(),
) -> KernelChoice:
    """`choose_attention_kernel` with the device's SM count and the FLAB_ATTENTION_KERNEL override."""
    forced = current().attention_kernel
    choice = choose_attention_kernel(
        num_seqs, num_tokens, num_kv_heads, max_seq_len, _sm_count(device), config, max_query_len
    )
    decode_only = num_seqs > 0 and (max_query_len == 1 if max_query_len is not None else num_tokens == num_seqs)
    if forced == UNIFIED or (forced == SPLIT_KV and not decode_only):
        return KernelChoice(UNIFIED, 1)
    if forced == SPLIT_KV and choice.kernel == UNIFIED:
        return KernelChoice(SPLIT_KV, max(2, min(config.max_splits, -(-max_seq_len // config.min_tokens_per_split))))
    return choice


def paged_attention_triton(a: PagedAttentionArgs) -> torch.Tensor:  # (T, Hq, D)
    """The Triton path: the unified mixed-batch kernel or split-KV decode, chosen per step (split-KV needs the
    host int `max_seq_len`; without it the unified kernel runs, with no device sync to find it)."""
    choice = KernelChoice(UNIFIED, 1)
    if a.max_seq_len is not None:
        choice = attention_kernel_for(
            a.seq_lens.shape[0], a.q.shape[0], a.k_cache.shape[2], a.max_seq_len, a.q.device, a.max_query_len
        )
    common = (a.q, a.k_cache, a.v_cache, a.query_start_loc, a.seq_lens, a.block_tables, a.scale)
    if choice.kernel == SPLIT_KV:
        from flab_kernels.paged_decode import paged_decode_triton

        return paged_decode_triton(*common, a.softcap, a.sliding_window, a.sinks, num_splits=choice.num_splits)
    from flab_kernels import paged_attention

    return paged_attention.paged_attention_triton(
        *common, a.softcap, a.sliding_window, a.sinks, a.max_query_len, a.max_seq_len
    )
