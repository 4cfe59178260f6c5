"""Unified paged attention (Triton): one launch for a mixed batch of prefill and decode sequences.

Grid: (q blocks, kv heads). A program takes BLOCK_Q new tokens of one sequence and all the
`G = Hq // Hkv` q heads that share one kv head, i.e. BLOCK_M = BLOCK_Q * G rows, so K/V are read
once per group (GQA/MQA without repeating KV). It walks the sequence's KV (cached prefix + new
tokens, through the block table) in tiles of TILE_N positions with an online softmax in fp32.
Causal, sliding-window, softcap and sink (extra softmax logit per q head) handling follow
`flab_kernels.attention_torch.paged_attention_torch`, the reference.

Q blocks are laid out as in vLLM's unified kernel: sequence s owns the q blocks starting at
`qsl[s] // BLOCK_Q + s`, so `T // BLOCK_Q + S` programs per kv head cover any ragged batch and a
program finds its sequence by binary search over query_start_loc (no host-side metadata).
"""

from __future__ import annotations

import torch

from flab_kernels._attention_common import check_attention_args, dot_precision
from flab_kernels._math import tanh_f32
from flab_kernels._triton import require_triton, tl, triton


@triton.jit
def _find_seq_idx(qsl_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """Last sequence s with qsl[s] // BLOCK_Q + s <= q_block."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _unified_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    sinks_ptr,
    qsl_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    num_seqs,
    scale,
    softcap,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,  # cache strides: block, slot-in-block, kv head
    stride_bt,  # block_tables row stride
    NUM_Q_PER_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # cache block size (any value; constexpr so // and % are cheap)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq_idx(qsl_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    q_block_local = q_block - (q_start // BLOCK_Q + seq)
    if q_block_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # tokens already in the cache before this step

    rows = tl.arange(0, BLOCK_M)
    q_local = q_block_local * BLOCK_Q + rows // NUM_Q_PER_KV  # (M,) new-token index in the sequence
    head = kv_head * NUM_Q_PER_KV + rows % NUM_Q_PER_KV  # (M,) q head
    row_valid = (rows < BLOCK_Q * NUM_Q_PER_KV) & (q_local < q_len)
    q_pos = ctx_len + q_local  # (M,) absolute position
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM

    token = (q_start + q_local).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )  # (M, BD)

    if USE_SINKS:  # the sink starts the running max and contributes exp(0) = 1 to the denominator
        m_i = tl.load(sinks_ptr + head, mask=row_valid, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # KV positions this q block needs: up to its last query, and from its first query's window
    last_q = tl.minimum((q_block_local + 1) * BLOCK_Q, q_len) - 1
    kv_end = ctx_len + last_q + 1
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(ctx_len + q_block_local * BLOCK_Q - window + 1, 0)
        kv_start = (kv_start // TILE_N) * TILE_N
    qk_scale = scale * 1.4426950408889634
    for start_n in range(kv_start, kv_end, TILE_N):
        kv_pos = start_n + tl.arange(0, TILE_N)  # (N,)
        kv_valid = kv_pos < kv_end
        phys = tl.load(block_tables_ptr + seq * stride_bt + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0)
        kv_off = phys.to(tl.int64) * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch  # (N,)
        k = tl.load(
            k_cache_ptr + kv_off[None, :] + d[:, None], mask=d_valid[:, None] & kv_valid[None, :], other=0.0
        )  # (BD, N)
        v = tl.load(
            v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_valid[:, None] & d_valid[None, :], other=0.0
        )  # (N, BD)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)  # (M, N) fp32
        if USE_SOFTCAP:
            s = softcap * tanh_f32(s * (scale / softcap)) * 1.4426950408889634
        else:
            s = s * qk_scale
        mask = row_valid[:, None] & kv_valid[None, :] & (kv_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            mask = mask & (kv_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])  # (M, N)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=DOT_PRECISION)  # (M, BD)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & d_valid[None, :],
    )


def unified_launch_config(
    max_query_len: int, num_q_per_kv: int, head_dim: int, dtype: torch.dtype = torch.bfloat16
) -> dict[str, int]:
    """Tile sizes. Chosen so the sm_90 builds do not spill registers (checked with
    tests/flab_kernels/compile_sm90.py + cuobjdump); their speed is UNMEASURED (no GPU in this session)."""
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    group = triton.next_power_of_2(num_q_per_kv)
    block_m = max(16 if max_query_len <= 1 else 64 if block_d <= 128 else 32, group)
    tile_n = 32 if block_d <= 128 else 16
    if dtype == torch.float32 and block_d >= 128:
        tile_n = 16
    return dict(
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_Q=block_m // num_q_per_kv,
        TILE_N=tile_n,
        num_warps=8 if block_m * block_d >= 64 * 128 or (dtype == torch.float32 and block_m >= 64) else 4,
    )


def paged_attention_triton(
    q: torch.Tensor,  # (T, Hq, D)
    k_cache: torch.Tensor,  # (NB, BS, Hkv, D)
    v_cache: torch.Tensor,  # (NB, BS, Hkv, D)
    query_start_loc: torch.Tensor,  # (S+1,) int32
    seq_lens: torch.Tensor,  # (S,) int32, cached + new
    block_tables: torch.Tensor,  # (S, MB) int32
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,  # (Hq,)
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:  # (T, Hq, D)
    """Attention of every new token over its sequence's cache, one launch for the whole batch.

    `max_query_len` only picks tile sizes; when None it is inferred without a device sync
    (1 when T == S, else treated as prefill). `max_seq_len` is unused here (kept for a common
    signature with the split-KV path).
    """
    require_triton()
    check_attention_args(q, k_cache, v_cache, block_tables, sinks, softcap, sliding_window)
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = 1 if num_tokens == num_seqs else num_tokens
    group = num_q_heads // num_kv_heads
    cfg = unified_launch_config(max_query_len, group, head_dim, q.dtype)
    num_q_blocks = num_tokens // cfg["BLOCK_Q"] + num_seqs
    _unified_attention_kernel[(num_q_blocks, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        sinks if sinks is not None else q,
        query_start_loc,
        seq_lens,
        block_tables,
        num_seqs,
        scale,
        softcap or 0.0,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        NUM_Q_PER_KV=group,
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        USE_SOFTCAP=softcap is not None,
        USE_WINDOW=sliding_window is not None,
        USE_SINKS=sinks is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        **cfg,
    )
    return out
