"""The values of one paged attention call, as one value: every implementation (the torch plan, the Triton unified
kernel, split-KV decode) reads them from here instead of twelve positional arguments."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BidirectionalSpan:
    """Positions [start, end) of one sequence of the step whose tokens attend to each other both ways (one image's
    tokens in Gemma 3): a query in the span also sees the span's later keys.
    The step computes the span's last token (the scheduler never splits a span across steps), so those keys are
    in the cache when the step attends."""

    seq: int  # index of the sequence in the step
    start: int
    end: int


@dataclass(frozen=True)
class PagedAttentionArgs:
    q: torch.Tensor  # (T, Hq, D)
    k_cache: torch.Tensor  # (NB, BS, Hkv, D)
    v_cache: torch.Tensor  # (NB, BS, Hkv, Dv)
    query_start_loc: torch.Tensor  # (S + 1,) int32
    seq_lens: torch.Tensor  # (S,) int32, cached + new
    block_tables: torch.Tensor  # (S, MB) int32
    scale: float
    softcap: float | None = None
    sliding_window: int | None = None
    sinks: torch.Tensor | None = None  # (Hq,)
    max_query_len: int | None = None  # host ints: on the Triton path they enable the split-KV choice
    max_seq_len: int | None = None
    # Spans of bidirectional attention in this step's prefills (empty: causal everywhere). Only the torch path
    # honours them; other kernels hand a step with spans to it.
    bidirectional: tuple[BidirectionalSpan, ...] = ()
