"""Split-KV decode (flash-decoding) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from flab_kernels.paged_decode import paged_decode_triton
from tests.flab_kernels.helpers import ATOL, make_paged_batch, reference_attention, seeded_randn

pytestmark = pytest.mark.usefixtures("kernel_device")

DECODE = ([1, 1, 1], [0, 47, 200])  # a first token, a mid-block length, a long context


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 2, 5, 16])  # 16 splits of 201 tokens: some splits are empty
@pytest.mark.parametrize("group", [1, 4])
def test_split_kv_equals_reference(dtype, num_splits, group):
    batch = make_paged_batch(*DECODE, num_q_heads=2 * group, num_kv_heads=2, head_dim=32, block_size=16, dtype=dtype)
    out = paged_decode_triton(*batch.args(), 0.2, num_splits=num_splits)
    torch.testing.assert_close(out.float(), reference_attention(batch, 0.2), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize(
    "kw",
    [dict(softcap=4.0), dict(sliding_window=33), dict(sinks=True), dict(softcap=20.0, sliding_window=70, sinks=True)],
    ids=str,
)
def test_split_kv_features(kw):
    kw = dict(kw)
    if kw.pop("sinks", False):
        kw["sinks"] = seeded_randn(8, seed=1) * 3
    batch = make_paged_batch(
        *DECODE, num_q_heads=8, num_kv_heads=2, head_dim=16, block_size=32, dtype=torch.float16, seed=2
    )
    out = paged_decode_triton(*batch.args(), 0.4, num_splits=4, **kw)
    torch.testing.assert_close(out.float(), reference_attention(batch, 0.4, **kw), atol=ATOL[torch.float16], rtol=0)


@pytest.mark.parametrize("head_dim", [80, 256])
def test_split_kv_head_dims(head_dim):
    batch = make_paged_batch(
        [1, 1], [9, 90], num_q_heads=2, num_kv_heads=1, head_dim=head_dim, block_size=16, dtype=torch.float16, seed=3
    )
    out = paged_decode_triton(*batch.args(), head_dim**-0.5, num_splits=3)
    ref = reference_attention(batch, head_dim**-0.5)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[torch.float16], rtol=0)


def test_split_kv_rejects_prefill():
    batch = make_paged_batch(
        [2, 1], [0, 3], num_q_heads=2, num_kv_heads=1, head_dim=16, block_size=16, dtype=torch.float32
    )
    with pytest.raises(ValueError, match="one new token"):
        paged_decode_triton(*batch.args(), 1.0)
