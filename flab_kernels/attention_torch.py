"""Paged attention in plain torch: the CPU path of the engine and the reference for the Triton kernels.

Cache layout (shared with the Triton kernels and both model implementations):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
Per step metadata:
    slot_mapping    [num_tokens]   int64  block_id * block_size + offset of each new token
    block_tables    [num_seqs, max_blocks] int32
    seq_lens        [num_seqs]     int32  cached + new tokens
    query_start_loc [num_seqs + 1] int32  cumulative new-token counts

The new tokens of sequence i are the last `n_i = qsl[i+1] - qsl[i]` of its `seq_lens[i]` tokens and
attend causally to everything before them (and, with a sliding window W, only to the last W tokens
including themselves, the convention transformers uses). A bidirectional span [s, e) of a sequence (one image's
tokens in Gemma 3) lets its queries also see the span's later keys: mask = (causal OR both in the span) AND window,
as transformers composes its masks (masking_utils: `blockwise_overlay` OR'ed, `sliding_window_overlay` AND'ed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from flab_kernels.attention_args import BidirectionalSpan


def store_kv_torch(
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    k_cache: torch.Tensor,  # (NB, BS, Hkv, D)
    v_cache: torch.Tensor,  # (NB, BS, Hkv, Dv)
    slot_mapping: torch.Tensor,  # (T,) int64
) -> None:
    """Write the new tokens' K/V into their slots."""
    k_cache.flatten(0, 1).index_copy_(0, slot_mapping, _as(key, k_cache.dtype))  # (NB * BS, Hkv, D)
    v_cache.flatten(0, 1).index_copy_(0, slot_mapping, _as(value, v_cache.dtype))


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)` without a dispatch when it already has it (these run per layer on every decode step)."""
    return x if x.dtype == dtype else x.to(dtype)


GROUP_SPLIT_MIN_SAVING = 512  # padded context tokens a split must save to pay for another gather + SDPA per layer
MAX_DECODE_GROUPS = 3


@dataclass
class DecodeGroup:
    """Decode sequences (one new token each) attended in one padded call over their gathered context."""

    tokens: torch.Tensor  # (Sg,) token index in the batch of each sequence
    blocks: torch.Tensor  # (Sg * NBg,) cache blocks of each sequence (its first block where padded)
    kv_pos: torch.Tensor  # (NBg * BS,) position of each gathered context column
    lens: torch.Tensor  # (Sg,) context length
    _masks: dict = field(default_factory=dict, repr=False)  # (window, dtype) -> additive mask

    def mask(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:  # (Sg, 1, 1, NBg*BS)
        """Additive mask (0 = attend, -inf = not), built once per step and window and shared by the layers."""
        key = (sliding_window, dtype)
        if key not in self._masks:
            lens = self.lens[:, None]
            keep = self.kv_pos[None, :] < lens  # (Sg, L)
            if sliding_window is not None:
                keep &= self.kv_pos[None, :] > lens - 1 - sliding_window
            mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]


@dataclass
class TorchAttentionPlan:
    """Gather indices built once per step and reused by every layer.

    Context is gathered a whole block at a time (`index_select` over cache blocks, not slot by slot).
    Decode sequences are batched into padded attention calls, grouped by context length when that saves
    enough padding (`split_by_length`); prefill sequences (several new tokens) are handled one by one, each
    over its gathered context. `compute_dtype` (None = the query's dtype) is the dtype the attention math
    runs in: fp32 for 16-bit models on CPUs whose 16-bit kernels are slow (the cache keeps the model dtype).
    """

    decode_groups: list[DecodeGroup]
    prefills: list[tuple[int, int, int, int, torch.Tensor]]  # (seq, q_start, q_end, context length, blocks)
    all_decode: bool  # every token of the batch is a decode token, in order, in one group (no scatter needed)
    compute_dtype: torch.dtype | None = None


def split_by_length(
    lens: list[int], block_size: int, max_groups: int = MAX_DECODE_GROUPS, min_saving: int = GROUP_SPLIT_MIN_SAVING
) -> list[int]:
    """Cut points into `lens` (sorted ascending) so that each group pads to its own longest context.

    Greedy: take the cut that saves the most padded tokens, while it saves at least `min_saving` and there
    are fewer than `max_groups` groups. Returns the sorted inner cut indices ([] = one group)."""
    padded = [-(-n // block_size) * block_size for n in lens]
    cuts: list[int] = []
    while len(cuts) + 1 < max_groups:
        bounds = [0] + cuts + [len(lens)]
        best, best_cut = min_saving - 1, None
        for lo, hi in zip(bounds, bounds[1:]):
            for cut in range(lo + 1, hi):  # [lo, cut) pads to padded[cut-1], [cut, hi) to padded[hi-1]
                saving = (cut - lo) * (padded[hi - 1] - padded[cut - 1])
                if saving > best:
                    best, best_cut = saving, cut
        if best_cut is None:
            return cuts
        cuts = sorted(cuts + [best_cut])
    return cuts


def _decode_group(
    ids: list[int], query_start_loc: list[int], seq_lens: list[int], block_tables: torch.Tensor, block_size: int
) -> DecodeGroup:
    device = block_tables.device
    max_blocks = -(-max(seq_lens[i] for i in ids) // block_size)
    col = torch.arange(max_blocks, device=device)
    sel = torch.tensor(ids, device=device, dtype=torch.long)
    lens = torch.tensor([seq_lens[i] for i in ids], device=device, dtype=torch.long)
    tables = block_tables[sel, :max_blocks].long()  # (Sg, NBg)
    # Padding reads the sequence's own first block (always written): never another block's stale data.
    blocks = torch.where(col < ((lens + block_size - 1) // block_size)[:, None], tables, tables[:, :1])
    tokens = torch.tensor([query_start_loc[i] for i in ids], device=device, dtype=torch.long)
    return DecodeGroup(tokens, blocks.reshape(-1), torch.arange(max_blocks * block_size, device=device), lens)


def build_plan(
    query_start_loc: list[int],
    seq_lens: list[int],
    block_tables: torch.Tensor,  # (S, MB) int32
    block_size: int,
    compute_dtype: torch.dtype | None = None,
    decode: bool = True,
) -> TorchAttentionPlan:
    """Precompute the gather indices of one step (python lists in, index tensors out). `decode=False`: a plan of
    the prefill sequences only (the caller attends the decode rows by other means)."""
    num_seqs = len(seq_lens)
    decode_ids = [i for i in range(num_seqs) if query_start_loc[i + 1] - query_start_loc[i] == 1]
    groups = []
    if decode_ids and decode:
        by_len = sorted(decode_ids, key=lambda i: seq_lens[i])
        cuts = split_by_length([seq_lens[i] for i in by_len], block_size)
        if not cuts:
            by_len = decode_ids  # one group: keep batch order, so an all-decode step needs no scatter
        bounds = [0] + cuts + [len(by_len)]
        groups = [
            _decode_group(by_len[lo:hi], query_start_loc, seq_lens, block_tables, block_size)
            for lo, hi in zip(bounds, bounds[1:])
        ]
    decode_set = set(decode_ids)
    prefills = []
    for i in range(num_seqs):
        if i not in decode_set:
            nb = -(-seq_lens[i] // block_size)
            prefills.append((i, query_start_loc[i], query_start_loc[i + 1], seq_lens[i], block_tables[i, :nb].long()))
    all_decode = decode and len(decode_ids) == num_seqs == query_start_loc[-1] and len(groups) == 1
    return TorchAttentionPlan(groups, prefills, all_decode, compute_dtype)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(NB, BS, Hkv, D) cache, (n,) block ids -> (n * BS, Hkv, D) in `dtype` (index_select: one copy per block)."""
    hkv, d = cache.shape[2:]
    return _as(torch.index_select(cache, 0, blocks).view(-1, hkv, d), dtype)


def _attend(
    q: torch.Tensor,  # (S, Hq, Q, D)
    k: torch.Tensor,  # (S, Hkv, L, D)
    v: torch.Tensor,  # (S, Hkv, L, D)
    mask: torch.Tensor,  # (S, 1, Q, L) bool (True = attend) or additive float
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,  # (Hq,)
) -> torch.Tensor:  # (S, Hq, Q, D)
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (S, Hq, Q, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if sinks is not None:
        sink_col = sinks.float().view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        scores = torch.cat([scores, sink_col], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


def paged_attention_planned(
    q: torch.Tensor,  # (T, Hq, D)
    k_cache: torch.Tensor,  # (NB, BS, Hkv, D)
    v_cache: torch.Tensor,  # (NB, BS, Hkv, Dv): Dv may differ from D (MLA)
    plan: TorchAttentionPlan,
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    bidirectional: Sequence[BidirectionalSpan] = (),
) -> torch.Tensor:  # (T, Hq, Dv)
    hkv, d = k_cache.shape[2:]
    dv = v_cache.shape[-1]
    cd = plan.compute_dtype or q.dtype
    out = q.new_empty((q.shape[0], q.shape[1], dv)) if not plan.all_decode else None
    mask_dtype = torch.float32 if softcap is not None or sinks is not None else cd
    for g in plan.decode_groups:
        sg = int(g.tokens.numel())
        qd = _as((q if plan.all_decode else q[g.tokens]).unsqueeze(2), cd)  # (Sg, Hq, 1, D)
        kd = _gather(k_cache, g.blocks, cd).view(sg, -1, hkv, d).transpose(1, 2)  # (Sg, Hkv, NBg*BS, D)
        vd = _gather(v_cache, g.blocks, cd).view(sg, -1, hkv, dv).transpose(1, 2)
        od = _as(
            _attend(qd, kd, vd, g.mask(sliding_window, mask_dtype), scale, softcap, sinks).squeeze(2), q.dtype
        )  # (Sg, Hq, Dv)
        if plan.all_decode:
            return od
        out.index_copy_(0, g.tokens, od)
    for seq, start, end, length, blocks in plan.prefills:
        n = end - start
        spans = [b for b in bidirectional if b.seq == seq]
        qp = q[start:end].transpose(0, 1).unsqueeze(0).to(cd)  # (1, Hq, n, D)
        kp = _gather(k_cache, blocks, cd)[:length].transpose(0, 1).unsqueeze(0)  # (1, Hkv, L, D)
        vp = _gather(v_cache, blocks, cd)[:length].transpose(0, 1).unsqueeze(0)
        if n == length and sliding_window is None and softcap is None and sinks is None and not spans:
            # no cached prefix: plain causal attention (lets SDPA take its fused causal kernel)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            op = _attend(qp, kp, vp, prefill_mask(n, length, sliding_window, spans, q.device), scale, softcap, sinks)
        out[start:end] = op[0].transpose(0, 1).to(q.dtype)
    return out


def prefill_mask(
    n: int, length: int, sliding_window: int | None, spans: Sequence[BidirectionalSpan], device: torch.device
) -> torch.Tensor:  # (1, 1, n, L) bool, True = attend
    """The mask of a sequence's `n` new tokens (the last of its `length`): causal, OR within a bidirectional span
    whose keys the step holds, AND the sliding window."""
    q_pos = torch.arange(length - n, length, device=device)[:, None]
    kv_pos = torch.arange(length, device=device)[None, :]
    mask = kv_pos <= q_pos  # (n, L)
    for span in spans:
        if span.end > length:
            raise ValueError(f"bidirectional span [{span.start}, {span.end}) ends past the step's {length} tokens")
        mask |= (q_pos >= span.start) & (q_pos < span.end) & (kv_pos >= span.start) & (kv_pos < span.end)
    if sliding_window is not None:
        mask &= kv_pos > q_pos - sliding_window
    return mask[None, None]


def paged_attention_torch(
    q: torch.Tensor,  # (T, Hq, D)
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # (S+1,) int32
    seq_lens: torch.Tensor,  # (S,) int32
    block_tables: torch.Tensor,  # (S, MB) int32
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    bidirectional: Sequence[BidirectionalSpan] = (),
) -> torch.Tensor:  # (T, Hq, D)
    """Reference entry point with the same signature as the Triton kernel (plus the bidirectional spans)."""
    plan = build_plan(query_start_loc.tolist(), seq_lens.tolist(), block_tables, k_cache.shape[1])
    return paged_attention_planned(q, k_cache, v_cache, plan, scale, softcap, sliding_window, sinks, bidirectional)
