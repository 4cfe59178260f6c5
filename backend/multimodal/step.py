"""One step's part of its requests' images: features computed at a request's first prefill step (and kept, also
across preemptions), the feature rows of the tokens this step computes, M-RoPE positions, and the spans of
bidirectional attention (Gemma 3's images) the step's attention honours."""

from __future__ import annotations

import time

import torch
from torch import nn

from flab_kernels.attention_args import BidirectionalSpan


def ensure_image_features(model: nn.Module, seqs: list) -> float:
    """Run the vision tower for each request of the step whose image features are not computed yet and still needed
    (a prefix-cache hit over all its image tokens needs none). -> the seconds it ran (0.0 when it did not)."""
    t0 = None
    for seq in seqs:
        inputs = getattr(seq, "images", None)
        if inputs is None or inputs.features is not None:
            continue
        if int(inputs.placeholder_positions[-1]) >= seq.num_computed_tokens:
            t0 = time.perf_counter() if t0 is None else t0
            inputs.features = model.encode_images(inputs)  # (N, H)
            inputs.num_encodes += 1
    if t0 is None:
        return 0.0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the features are ready, not only queued
    return time.perf_counter() - t0


def step_embeddings(seqs: list, num_new: list[int]) -> tuple[list[int], list[torch.Tensor]] | None:
    """(token indices in the step, feature rows) of the image tokens this step computes; None when there are none."""
    rows: list[int] = []
    values: list[torch.Tensor] = []
    offset = 0
    for seq, n in zip(seqs, num_new):
        inputs = getattr(seq, "images", None)
        start = seq.num_computed_tokens
        if inputs is not None:
            pos = inputs.placeholder_positions  # (N,)
            lo, hi = torch.searchsorted(pos, torch.tensor([start, start + n])).tolist()
            if hi > lo:
                rows.extend((pos[lo:hi] - start + offset).tolist())
                values.append(inputs.features[lo:hi])  # (k, H)
        offset += n
    return (rows, values) if rows else None


def step_mrope_positions(seqs: list, num_new: list[int]) -> torch.Tensor | None:
    """(3, T) M-RoPE positions of the step when a request of it has them (the others: their position thrice)."""
    if not any(getattr(s, "images", None) is not None and s.images.mrope_positions is not None for s in seqs):
        return None
    parts = []
    for seq, n in zip(seqs, num_new):
        start = seq.num_computed_tokens
        inputs = getattr(seq, "images", None)
        plain = torch.arange(start, start + n).expand(3, n)  # (3, n)
        if inputs is None or inputs.mrope_positions is None:
            parts.append(plain)
            continue
        known = inputs.mrope_positions[:, start : start + n]  # (3, k) prompt positions from get_rope_index
        after = plain[:, known.shape[1] :] + inputs.mrope_delta  # tokens past the prompt
        parts.append(torch.cat([known, after], dim=1))
    return torch.cat(parts, dim=1)  # (3, T)


def step_bidirectional_spans(seqs: list, num_new: list[int]) -> tuple[BidirectionalSpan, ...]:
    """The bidirectional spans in which this step computes a query that sees a later key of its span (a span is
    computed whole by one step: backend/core/scheduler.py never ends a chunk inside one)."""
    out: list[BidirectionalSpan] = []
    for i, (seq, n) in enumerate(zip(seqs, num_new)):
        inputs = getattr(seq, "images", None)
        start, stop = seq.num_computed_tokens, seq.num_computed_tokens + n
        for s, e in inputs.bidirectional_spans if inputs is not None else ():
            if max(s, start) >= e - 1:  # done before this step, or only its last token left: causal suffices
                continue
            if s >= stop:
                break
            if e > stop:
                raise RuntimeError(f"a step ends at position {stop} inside the bidirectional span [{s}, {e})")
            out.append(BidirectionalSpan(i, s, e))
    return tuple(out)
