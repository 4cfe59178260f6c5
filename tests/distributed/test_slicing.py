"""In-process checks of the sharding arithmetic (no worker processes): each rank's slice of a linear, plain or
quantized, computes exactly the full layer's rows (column parallel) or its partial sum (row parallel); head and
vocab partitions; refusals that name what does not divide or has no plan."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from backend.core.errors import UnsupportedModelError
from backend.distributed.comm import TPContext
from backend.distributed.hf_plan import shard_transformers
from backend.distributed.partition import head_shard, vocab_range
from backend.distributed.slicing import int_canonical, take_cols, take_rows
from backend.quantization.fp8 import Fp8Linear
from backend.quantization.int4 import Int4Config, Int4Linear
from backend.quantization.int8 import Int8Linear

N, K = 48, 128


def quantized(kind: str, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    make = {
        "int8": lambda: Int8Linear(K, N, True),
        "int4": lambda: Int4Linear(K, N, True, config=Int4Config(group_size=32)),
        "fp8": lambda: Fp8Linear(K, N, True),
    }[kind]
    m = make()
    m.load_tensor("weight", weight, torch.device("cpu"), dtype)
    m.load_tensor("bias", bias, torch.device("cpu"), dtype)
    m.finalize()
    return m


def layers(dtype: torch.dtype) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    w, b = torch.randn(N, K) * 0.1, torch.randn(N) * 0.1
    plain = nn.Linear(K, N).to(dtype)
    with torch.no_grad():
        plain.weight.copy_(w)
        plain.bias.copy_(b)
    out = {"plain": plain}
    for kind in ("int8", "int4", "fp8"):
        out[kind] = quantized(kind, w, b, dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "int8", "int4", "fp8"])
def test_rows_and_cols_match_the_full_layer(kind, dtype):
    full = layers(dtype)[kind]
    x = torch.randn(5, K).to(dtype)
    with torch.inference_mode():
        want = full(x).float()  # (5, N)
        rows = torch.cat([torch.arange(0, 16), torch.arange(32, 48)])  # 32 rows: the same kernels
        part = take_rows(copy.deepcopy(full), rows, kind)
        assert torch.equal(part(x).float(), want[:, rows])
        total = None
        for start, end in ((0, 64), (64, 128)):
            shard, bias = take_cols(copy.deepcopy(full), start, end, kind)
            y = shard(x[:, start:end]).float()
            total = y if total is None else total + y
        total = total + bias.float()
    tol = 1e-5 if dtype == torch.float32 else 0.06
    assert torch.allclose(total, want, atol=tol, rtol=tol), (total - want).abs().max()


def test_int4_cpu_pack_layout_reads_back_exactly():
    """bf16 int4 runs on torch's opaque CPU blocked layout; reading it back and laying it out again gives the same
    packed weight and scales, bit for bit."""
    layer = layers(torch.bfloat16)["int4"]
    assert layer.kernel == "cpu_int4pack"
    again = copy.deepcopy(layer)
    again._set_int_weight(*int_canonical(again))
    assert again.kernel == "cpu_int4pack"
    assert torch.equal(again.w_q, layer.w_q) and torch.equal(again.w_scales, layer.w_scales)


def test_int4_group_misaligned_shard_is_refused():
    layer = layers(torch.float32)["int4"]
    with pytest.raises(UnsupportedModelError, match="whole quantization groups"):
        take_cols(layer, 0, 48, "layer")


def test_head_partition():
    assert head_shard(8, 2, 1, 2, "m") == head_shard(8, 2, 1, 2, "m")
    s = head_shard(8, 2, 1, 2, "m")
    assert (s.q_start, s.q_count, s.kv_start, s.kv_count, s.kv_replicated) == (4, 4, 1, 1, False)
    s = head_shard(8, 1, 1, 2, "m")  # fewer kv heads than ranks: the one kv head on both
    assert (s.q_start, s.q_count, s.kv_start, s.kv_count, s.kv_replicated) == (4, 4, 0, 1, True)
    s = head_shard(8, 2, 3, 4, "m")  # q heads 6-7 read kv head 1
    assert (s.q_start, s.kv_start, s.kv_count) == (6, 1, 1)
    with pytest.raises(UnsupportedModelError, match="6 attention heads do not divide over tp_size=4"):
        head_shard(6, 6, 0, 4, "m")
    with pytest.raises(UnsupportedModelError, match="6 kv heads do not divide"):
        head_shard(12, 6, 0, 4, "m")
    assert [vocab_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 10)]


def test_model_without_a_tp_plan_is_refused_with_its_name(tiny_model):
    from transformers import AutoConfig

    from backend.models.transformers import TransformersModel

    config = AutoConfig.from_pretrained(tiny_model("gpt2"))
    model = TransformersModel(config, torch.float32)
    with pytest.raises(
        UnsupportedModelError, match=r"GPT2LMHeadModel \(model_type='gpt2'\) has no tensor-parallel plan"
    ):
        shard_transformers(model, TPContext(0, 2))


def test_act_order_weights_split_by_rows_and_refuse_a_column_split():
    """GPTQ act-order (g_idx): the canonical form reads back through the column permutation; output rows split
    exactly; an input-feature split is refused (its groups are spread over the whole input)."""
    torch.manual_seed(1)
    m = Int4Linear(K, N, False, config=Int4Config(group_size=32))
    m.device, m.act_dtype = torch.device("cpu"), torch.float32
    q = torch.randint(-8, 8, (N, K), dtype=torch.int8)
    scales = torch.rand(N, K // 32) * 0.1 + 0.01
    zeros = torch.randint(-2, 3, (N, K // 32)).float()
    g_idx = (torch.arange(K) // 32)[torch.randperm(K)]
    m._set_int_weight(q, scales, zeros, g_idx)
    assert m.w_perm is not None
    q2, s2, z2, g2 = int_canonical(m)
    assert torch.equal(q2, q) and torch.equal(s2, scales) and torch.equal(z2, zeros) and torch.equal(g2, g_idx)
    x = torch.randn(3, K)
    with torch.inference_mode():
        want = m(x)
        rows = torch.arange(16, 48)
        assert torch.equal(take_rows(copy.deepcopy(m), rows, "gptq")(x), want[:, rows])
    with pytest.raises(UnsupportedModelError, match="act-order"):
        take_cols(m, 0, 64, "gptq")
