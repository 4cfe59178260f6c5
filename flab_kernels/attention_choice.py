"""Which Triton attention kernel runs a step: the unified kernel or split-KV decode.

The rule (UNMEASURED: written without a GPU; `python -m flab_kernels.bench` on a GPU is how to tune it):

    split-KV iff  the batch is decode-only (one new token per sequence)
             and  max_seq_len >= min_context                       (long context: enough KV to split)
             and  num_seqs * num_kv_heads < sm_count * busy_factor (unified grid leaves SMs idle)
    num_splits = min(max_splits,
                     ceil(sm_count * target_waves / (num_seqs * num_kv_heads)),  # fill the GPU
                     max_seq_len // min_tokens_per_split)                         # splits not too small
    and if that is < 2 the unified kernel runs.

Why: the unified kernel runs S * Hkv programs for a decode batch, each streaming one whole
context; with few programs per SM the memory system is underused. Splitting the KV range
multiplies the programs at the cost of a small merge kernel and fp32 partials. With many
sequences (or short contexts) the unified grid already fills the GPU and the merge is overhead.

Override with `KernelChoiceConfig` or the env var FLAB_ATTENTION_KERNEL=unified|split_kv|auto
(read by `flab_kernels.ops.paged_attention_triton`, the triton attention backend's entry).
"""

from __future__ import annotations

from dataclasses import dataclass

UNIFIED = "unified"
SPLIT_KV = "split_kv"


@dataclass(frozen=True)
class KernelChoiceConfig:
    min_context: int = 2048  # shorter contexts: unified (unmeasured)
    busy_factor: float = 1.0  # split only while S * Hkv < sm_count * busy_factor
    target_waves: float = 2.0  # aim for this many programs per SM after splitting
    min_tokens_per_split: int = 512  # each split gets at least this many KV tokens
    max_splits: int = 64


@dataclass(frozen=True)
class KernelChoice:
    kernel: str  # UNIFIED | SPLIT_KV
    num_splits: int  # 1 for UNIFIED


def choose_attention_kernel(
    num_seqs: int,
    num_tokens: int,
    num_kv_heads: int,
    max_seq_len: int,
    sm_count: int,
    config: KernelChoiceConfig = KernelChoiceConfig(),
    max_query_len: int | None = None,
) -> KernelChoice:
    """Apply the rule in the module docstring; pure function of host-side integers (no device sync).

    Decode-only is `max_query_len == 1` when given, else `num_tokens == num_seqs` (every scheduled
    sequence has at least one new token).
    """
    decode_only = num_seqs > 0 and (max_query_len == 1 if max_query_len is not None else num_tokens == num_seqs)
    programs = num_seqs * num_kv_heads
    if not decode_only or max_seq_len < config.min_context or programs >= sm_count * config.busy_factor:
        return KernelChoice(UNIFIED, 1)
    fill = -(-int(sm_count * config.target_waves) // programs)
    splits = min(config.max_splits, fill, max_seq_len // max(config.min_tokens_per_split, 1))
    if splits < 2:
        return KernelChoice(UNIFIED, 1)
    return KernelChoice(SPLIT_KV, splits)
