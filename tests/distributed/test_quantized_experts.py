"""MoE experts quantized on the fly, cut for tensor parallelism without processes (backend/distributed/experts.py).

Each rank's sliced experts compute a partial sum; the ranks' partial sums add up to the whole quantized experts'
output (the slices are exactly the full layers' rows / columns, with their scales); the meta placeholders take the
shard's shapes; an int4 split that does not hold whole groups is refused with the sizes."""

from __future__ import annotations

import copy

import pytest
import torch

from backend.core.errors import UnsupportedModelError
from backend.distributed.comm import TPContext
from backend.distributed.native import _shard_experts
from backend.models.moe import Experts
from backend.quantization import quantize_experts, resolve_quantization

E, H, T, TOP_K = 4, 64, 9, 2


def _experts(inter: int, request_: str) -> Experts:
    g = torch.Generator().manual_seed(0)
    experts = Experts(E, H, inter, "silu")
    experts.gate_up_proj.data = torch.randn(E, 2 * inter, H, generator=g) * 0.1
    experts.down_proj.data = torch.randn(E, H, inter, generator=g) * 0.1
    assert quantize_experts(experts, resolve_quantization(request_, {})) == 1
    return experts


def _routing() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g)  # (T, H)
    weights, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=g), dim=-1), TOP_K, dim=-1)  # (T, K)
    return x, weights, ids


@pytest.mark.parametrize("request_", ["int8", "int4:g32", "fp8"])
def test_rank_partial_sums_add_up_to_the_whole_experts(request_):
    inter = 128
    full = _experts(inter, request_)
    x, weights, ids = _routing()
    want = full(x, weights, ids)  # (T, H)
    partial = []
    for rank in range(2):
        shard = copy.deepcopy(full)
        _shard_experts(shard, TPContext(rank, 2), "experts")
        assert shard.gate_up_proj.shape == (E, inter, H) and shard.down_proj.shape == (E, H, inter // 2)
        assert shard.gate_up_proj.is_meta and shard.gate_up_proj.flab_quantized_away
        assert all(m.out_features == inter and m.in_features == H for m in shard.flab_quantized.up)
        assert all(m.out_features == H and m.in_features == inter // 2 for m in shard.flab_quantized.down)
        partial.append(shard(x, weights, ids))
    got = partial[0] + partial[1]
    # the same products split in two halves of the intermediate sum: equal up to the fp32 order of additions
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(partial[0], want)  # each rank really holds only a part


def test_rank_gate_and_up_halves_are_the_full_rows():
    full = _experts(128, "int8")
    shard = copy.deepcopy(full)
    _shard_experts(shard, TPContext(1, 2), "experts")
    for e in range(E):
        whole = full.flab_quantized.up[e].dequantize()  # (2I, H)
        rows = torch.cat([whole[64:128], whole[192:256]])  # rank 1: gate [64, 128) and up [I + 64, I + 128)
        assert torch.equal(shard.flab_quantized.up[e].dequantize(), rows)
        assert torch.equal(shard.flab_quantized.down[e].dequantize(), full.flab_quantized.down[e].dequantize()[:, 64:])


def test_int4_split_off_group_boundaries_is_refused():
    experts = _experts(96, "int4:g32")  # 3 groups of 32 per row; 48 columns per rank
    with pytest.raises(UnsupportedModelError, match=r"experts.down_proj.0: the shard's input features \[0, 48\) do "
                       r"not hold whole quantization groups of 32"):  # fmt: skip
        _shard_experts(experts, TPContext(0, 2), "experts")
