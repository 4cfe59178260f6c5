"""Unified Triton paged attention (interpreter on CPU) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from flab_kernels.paged_attention import paged_attention_triton, unified_launch_config
from tests.flab_kernels.helpers import ATOL, make_paged_batch, reference_attention, seeded_randn

pytestmark = pytest.mark.usefixtures("kernel_device")

# Ragged mixed batch: prefill without prefix, decode crossing a block boundary (31 cached -> 32),
# prefill with a cached prefix spanning blocks, a short decode, a small chunked-prefill tail.
MIXED = ([7, 1, 19, 1, 3], [0, 31, 13, 5, 45])
DTYPES = [torch.float32, torch.float16]


def _check(batch, dtype, scale=0.25, max_query_len=None, **kw):
    out = paged_attention_triton(*batch.args(), scale, max_query_len=max_query_len, **kw)
    assert out.shape == batch.q.shape and out.dtype == dtype
    ref = reference_attention(batch, scale, **kw)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_batch_gqa_block_sizes(dtype, group, block_size):
    batch = make_paged_batch(
        *MIXED, num_q_heads=2 * group, num_kv_heads=2, head_dim=32, block_size=block_size, dtype=dtype
    )
    _check(batch, dtype, max_query_len=batch.max_query_len)


FEATURES = {
    "softcap": dict(softcap=3.0),  # small cap so tanh saturates for some scores
    "window5": dict(sliding_window=5),
    "window16": dict(sliding_window=16),  # == block size: window edge on a block boundary
    "sinks": dict(sinks=True),
    "all": dict(softcap=5.0, sliding_window=9, sinks=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_softcap_window_sinks(dtype, feature):
    kw = dict(FEATURES[feature])
    batch = make_paged_batch(*MIXED, num_q_heads=8, num_kv_heads=2, head_dim=16, block_size=16, dtype=dtype, seed=1)
    if kw.pop("sinks", False):
        kw["sinks"] = seeded_randn(8, seed=2) * 2
    _check(batch, dtype, scale=0.5, **kw)


@pytest.mark.parametrize(
    "head_dim,dtype",
    [
        (64, torch.float16),
        (80, torch.float16),
        (80, torch.float32),
        (96, torch.float16),
        (128, torch.float16),
        (256, torch.float16),
    ],
)
def test_head_dims(head_dim, dtype):
    batch = make_paged_batch(
        [5, 1], [3, 20], num_q_heads=4, num_kv_heads=2, head_dim=head_dim, block_size=16, dtype=dtype, seed=3
    )
    _check(batch, dtype, scale=head_dim**-0.5)


def test_non_power_of_two_group_with_window_and_sinks():
    batch = make_paged_batch(
        *MIXED, num_q_heads=6, num_kv_heads=2, head_dim=16, block_size=32, dtype=torch.float32, seed=4
    )
    _check(batch, torch.float32, sliding_window=6, sinks=torch.randn(6))


def test_long_prefill_many_q_blocks_with_window():
    # 150 new tokens over a 20-token prefix: several q blocks, each skipping KV tiles left of its window
    batch = make_paged_batch(
        [150, 1], [20, 70], num_q_heads=2, num_kv_heads=1, head_dim=16, block_size=16, dtype=torch.float16, seed=5
    )
    _check(batch, torch.float16, sliding_window=24)


@pytest.mark.parametrize("max_query_len", [None, 1])
def test_decode_only_batch(max_query_len):
    batch = make_paged_batch(
        [1, 1, 1], [0, 15, 50], num_q_heads=8, num_kv_heads=1, head_dim=32, block_size=16, dtype=torch.float32, seed=6
    )
    _check(batch, torch.float32, max_query_len=max_query_len)


def test_strided_q_view_of_qkv():
    batch = make_paged_batch(
        *MIXED, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, seed=7
    )
    t = batch.q.shape[0]
    qkv = torch.randn(t, (4 + 2 * 2) * 16)
    batch.q = qkv[:, : 4 * 16].view(t, 4, 16)  # (T, Hq, D) with row stride (Hq + 2 Hkv) * D
    assert not batch.q.is_contiguous()
    _check(batch, torch.float32)


def test_launch_config_covers_groups():
    for group in (1, 3, 8, 16, 32):
        cfg = unified_launch_config(64, group, 80)
        assert cfg["BLOCK_Q"] >= 1 and cfg["BLOCK_Q"] * group <= cfg["BLOCK_M"] and cfg["BLOCK_D"] == 128


def test_rejects_bad_inputs():
    batch = make_paged_batch([2], [0], num_q_heads=3, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_triton(*batch.args(), 1.0)


def test_garbage_outside_the_context_does_not_leak():
    # NaN in a cache block no sequence owns, with block-table padding pointing at it (block 0):
    # the kernel must only read positions < seq_len (the torch reference, which pads gathers with
    # slot 0, relies on a finite cache there instead)
    batch = make_paged_batch(
        [2, 1], [3, 40], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, seed=8
    )
    ref = reference_attention(batch, 0.3)
    spare = (set(range(batch.k_cache.shape[0])) - set(batch.block_tables.flatten().tolist())).pop()
    tables = batch.block_tables.clone()
    tables[tables == 0] = spare  # move block 0's data to the spare block...
    batch.k_cache[spare], batch.v_cache[spare] = batch.k_cache[0].clone(), batch.v_cache[0].clone()
    batch.k_cache[0] = float("nan")  # ...and poison block 0
    batch.v_cache[0] = float("nan")
    tables[0, 1:] = 0  # padding entries of the short sequence's row
    batch.block_tables = tables
    out = paged_attention_triton(*batch.args(), 0.3)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)
