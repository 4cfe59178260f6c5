"""Split-KV paged decode (flash-decoding, Triton) for long contexts with few sequences.

A decode-only batch (one new token per sequence) gives the unified kernel only S * Hkv programs,
too few to fill the GPU when contexts are long. Here each sequence's visible KV range is cut
into `num_splits` chunks; grid (S, Hkv, num_splits). Each program attends its chunk for the G q
heads of one kv head and writes a normalised partial output plus its log-sum-exp (base 2). A
second small kernel merges the splits per (sequence, q head) by log-sum-exp weights; attention
sinks enter there as one more term of the denominator. Which path runs is decided by
`flab_kernels.attention_choice.choose_attention_kernel`.
"""

from __future__ import annotations

import torch

from flab_kernels._attention_common import check_attention_args, dot_precision
from flab_kernels._math import tanh_f32
from flab_kernels._triton import require_triton, tl, triton


@triton.jit
def _split_kv_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    part_out_ptr,
    part_lse_ptr,
    qsl_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    scale,
    softcap,
    window,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    stride_ps,
    stride_ph,
    stride_pp,  # partial out (S, Hq, P, BD); partial lse (S, Hq, P) uses the first three / BD
    NUM_Q_PER_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # cache block size (any value; constexpr so // and % are cheap)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    token = tl.load(qsl_ptr + seq).to(tl.int64)  # the sequence's single new token, at position seq_len - 1
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - kv_lo, NUM_SPLITS), TILE_N) * TILE_N
    start = kv_lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    rows = tl.arange(0, BLOCK_H)
    row_valid = rows < NUM_Q_PER_KV
    head = kv_head * NUM_Q_PER_KV + rows  # (H,)
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    q = tl.load(
        q_ptr + token * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )  # (H, BD)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    for start_n in range(start, end, TILE_N):
        kv_pos = start_n + tl.arange(0, TILE_N)  # (N,)
        kv_valid = kv_pos < end
        phys = tl.load(block_tables_ptr + seq * stride_bt + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0)
        kv_off = phys.to(tl.int64) * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        k = tl.load(
            k_cache_ptr + kv_off[None, :] + d[:, None], mask=d_valid[:, None] & kv_valid[None, :], other=0.0
        )  # (BD, N)
        v = tl.load(
            v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_valid[:, None] & d_valid[None, :], other=0.0
        )  # (N, BD)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)  # (H, N)
        if USE_SOFTCAP:
            s = softcap * tanh_f32(s * (scale / softcap)) * 1.4426950408889634
        else:
            s = s * qk_scale
        s = tl.where(row_valid[:, None] & kv_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0.0
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))  # (H,) base 2; -inf = empty split
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    part = seq * stride_ps + head * stride_ph + split * stride_pp  # (H,)
    tl.store(part_out_ptr + part[:, None] + d[None, :], out, mask=row_valid[:, None] & d_valid[None, :])
    tl.store(part_lse_ptr + part // BLOCK_D, lse, mask=row_valid)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    sinks_ptr,
    qsl_ptr,
    stride_ps,
    stride_ph,
    stride_pp,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    USE_SINKS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    p = tl.arange(0, SPLITS_PAD)
    p_valid = p < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    base = seq * stride_ps + head * stride_ph + p * stride_pp  # (P,)
    lse = tl.load(part_lse_ptr + base // BLOCK_D, mask=p_valid, other=float("-inf"))  # (P,)
    g = tl.max(lse, 0)
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        g = tl.maximum(g, sink)
    w = tl.exp2(lse - g)  # (P,) empty splits weigh 0
    denom = tl.sum(w, 0)
    if USE_SINKS:
        denom += tl.exp2(sink - g)
    parts = tl.load(part_out_ptr + base[:, None] + d[None, :], mask=p_valid[:, None] & d_valid[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / denom  # (BD,)
    token = tl.load(qsl_ptr + seq).to(tl.int64)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_valid)


def split_kv_launch_config(num_q_per_kv: int, head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes: no register spills in the sm_90 builds (tests/flab_kernels/compile_sm90.py); speed UNMEASURED."""
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    return dict(
        BLOCK_D=block_d,
        BLOCK_H=max(16, triton.next_power_of_2(num_q_per_kv)),
        TILE_N=32 if block_d <= 128 and dtype != torch.float32 else 16,
        num_warps=4 if block_d <= 128 else 8,
    )


def paged_decode_triton(
    q: torch.Tensor,  # (S, Hq, D): exactly one new token per sequence
    k_cache: torch.Tensor,  # (NB, BS, Hkv, D)
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # (S+1,) int32, == arange(S+1) for a decode batch
    seq_lens: torch.Tensor,  # (S,) int32
    block_tables: torch.Tensor,  # (S, MB) int32
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,  # (Hq,)
    num_splits: int = 8,
) -> torch.Tensor:  # (S, Hq, D)
    """Decode attention with the KV range split `num_splits` ways and merged by log-sum-exp."""
    require_triton()
    check_attention_args(q, k_cache, v_cache, block_tables, sinks, softcap, sliding_window)
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens != num_seqs:
        raise ValueError(
            f"split-KV decode needs one new token per sequence, got {num_tokens} tokens for {num_seqs} sequences"
        )
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    cfg = split_kv_launch_config(group, head_dim, q.dtype)
    block_d = cfg["BLOCK_D"]
    # fp32 partials; part_lse's strides are part_out's divided by BLOCK_D (same layout minus the last dim)
    part_out = torch.empty(num_seqs, num_q_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    ps, ph, pp = part_out.stride(0), part_out.stride(1), part_out.stride(2)
    _split_kv_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        part_out,
        part_lse,
        query_start_loc,
        seq_lens,
        block_tables,
        scale,
        softcap or 0.0,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        ps,
        ph,
        pp,
        NUM_Q_PER_KV=group,
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits,
        USE_SOFTCAP=softcap is not None,
        USE_WINDOW=sliding_window is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        **cfg,
    )
    _merge_splits_kernel[(num_seqs, num_q_heads)](
        part_out,
        part_lse,
        out,
        sinks if sinks is not None else q,
        query_start_loc,
        ps,
        ph,
        pp,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits),
        USE_SINKS=sinks is not None,
    )
    return out
