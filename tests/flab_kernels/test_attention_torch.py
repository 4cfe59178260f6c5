"""The CPU torch paged attention (block gathers, shared decode masks, compute dtype) against a naive
per-token float64 reference that reads the cache slot by slot."""

from __future__ import annotations

import math

import pytest
import torch

from flab_kernels.attention_torch import build_plan, paged_attention_planned, split_by_length
from tests.flab_kernels.helpers import make_paged_batch

MIXED = ([7, 1, 19, 1, 3, 1], [0, 31, 13, 5, 45, 70])


def naive_attention(b, scale, softcap=None, sliding_window=None, sinks=None) -> torch.Tensor:  # (T, Hq, D) fp64
    qsl, lens, bs = b.query_start_loc.tolist(), b.seq_lens.tolist(), b.k_cache.shape[1]
    hq, hkv = b.q.shape[1], b.k_cache.shape[2]
    out = torch.zeros(b.q.shape, dtype=torch.float64)
    for s, length in enumerate(lens):
        slots = [int(b.block_tables[s, p // bs]) * bs + p % bs for p in range(length)]
        k = b.k_cache.flatten(0, 1)[slots].double()  # (L, Hkv, D)
        v = b.v_cache.flatten(0, 1)[slots].double()
        n = qsl[s + 1] - qsl[s]
        for i in range(n):
            pos = length - n + i
            lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            for h in range(hq):
                kv = h // (hq // hkv)
                scores = k[lo : pos + 1, kv] @ b.q[qsl[s] + i, h].double() * scale
                if softcap is not None:
                    scores = torch.tanh(scores / softcap) * softcap
                weights = torch.exp(scores - scores.max())
                denom = weights.sum() + (0 if sinks is None else math.exp(float(sinks[h]) - scores.max()))
                out[qsl[s] + i, h] = (weights / denom) @ v[lo : pos + 1, kv]
    return out


def _run(b, scale, compute_dtype=None, **kw):
    plan = build_plan(
        b.query_start_loc.tolist(), b.seq_lens.tolist(), b.block_tables, b.k_cache.shape[1], compute_dtype
    )
    return paged_attention_planned(b.q, b.k_cache, b.v_cache, plan, scale, **kw)


FEATURES = {
    "plain": {},
    "softcap": dict(softcap=4.0),
    "window": dict(sliding_window=9),
    "sinks": dict(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0])),
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("new_lens,cached", [MIXED, ([1, 1, 1], [16, 3, 40])], ids=["mixed", "decode"])
def test_fp32_matches_naive(feature, new_lens, cached):
    b = make_paged_batch(
        new_lens, cached, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, seed=5
    )
    out = _run(b, 0.3, **FEATURES[feature])
    torch.testing.assert_close(out.double(), naive_attention(b, 0.3, **FEATURES[feature]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("feature", list(FEATURES))
def test_bf16_inputs_with_fp32_math(feature):
    """16-bit cache and queries, fp32 math (the CPU path for bf16 models): only the output's rounding to
    bf16 remains, at most half a bf16 ulp (2^-9 relative) of O(1) values."""
    b = make_paged_batch(
        *MIXED, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.bfloat16, seed=6
    )
    out = _run(b, 0.3, compute_dtype=torch.float32, **FEATURES[feature])
    assert out.dtype == torch.bfloat16
    ref = naive_attention(b, 0.3, **FEATURES[feature])
    torch.testing.assert_close(out.double(), ref, atol=2**-8, rtol=2**-8)
    # the same inputs with bf16 math are further off: fp32 math is the more accurate path
    err16 = (_run(b, 0.3, **FEATURES[feature]).double() - ref).abs().max()
    assert (out.double() - ref).abs().max() <= err16


def test_decode_mask_is_built_once_per_window():
    b = make_paged_batch([1, 1], [20, 3], num_q_heads=2, num_kv_heads=1, head_dim=8, block_size=4, dtype=torch.float32)
    plan = build_plan(b.query_start_loc.tolist(), b.seq_lens.tolist(), b.block_tables, 4)
    assert len(plan.decode_groups) == 1 and plan.all_decode  # too little padding to split
    m1 = plan.decode_groups[0].mask(None, torch.float32)
    assert plan.decode_groups[0].mask(None, torch.float32) is m1
    assert plan.decode_groups[0].mask(5, torch.float32) is not m1
    # sequence 2 has 4 tokens: its columns past 4 are masked with -inf, the rest are 0
    assert torch.isinf(m1[1, 0, 0, 4:]).all() and (m1[1, 0, 0, :4] == 0).all()


def test_split_by_length_takes_the_cuts_that_save_most_padding():
    assert split_by_length([16, 16, 32], 16) == []  # saves 32 padded tokens: not worth another call
    assert split_by_length([10, 20, 700, 710], 16) == [2]  # the short pair no longer pads to 720
    assert split_by_length([10] * 4 + [300] * 4 + [900] * 4, 16) == [4, 8]
    assert split_by_length([10] * 4 + [300] * 4 + [900] * 4, 16, max_groups=2) == [8]
    assert split_by_length([5] * 8, 16) == [] and split_by_length([7], 16) == []


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("new_lens", [[1] * 7, [1, 1, 5, 1, 1, 1, 1]], ids=["decode", "with-prefill"])
def test_length_groups_match_naive(feature, new_lens):
    """Decode contexts of very different lengths are split into groups (each padded to its own longest),
    attended separately and scattered back into batch order."""
    cached = [700, 9, 20, 650, 3, 15, 980]
    b = make_paged_batch(
        new_lens, cached, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, seed=7
    )
    plan = build_plan(b.query_start_loc.tolist(), b.seq_lens.tolist(), b.block_tables, 16)
    assert len(plan.decode_groups) >= 2 and not plan.all_decode
    grouped = sorted(t for g in plan.decode_groups for t in g.tokens.tolist())
    assert grouped == [b.query_start_loc[i].item() for i, n in enumerate(new_lens) if n == 1]
    out = paged_attention_planned(b.q, b.k_cache, b.v_cache, plan, 0.3, **FEATURES[feature])
    torch.testing.assert_close(out.double(), naive_attention(b, 0.3, **FEATURES[feature]), atol=1e-5, rtol=0)
