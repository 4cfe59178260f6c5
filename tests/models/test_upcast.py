"""UpcastLinear: 16-bit weights with an fp32 (K, N) copy for many-row products on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backend import Engine, SamplingParams
from backend.layers.upcast import MAX_HALF_ROWS, UpcastLinear, upcast_candidates, upcast_linears
from backend.tiny_models import build_tiny_model


def _linear(bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 48, bias=bias).to(torch.bfloat16)


@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_use_the_16bit_weight_many_rows_the_fp32_copy(bias):
    layer = _linear(bias)
    plain = nn.Linear(64, 48, bias=bias).to(torch.bfloat16)
    plain.load_state_dict(layer.state_dict())
    assert upcast_linears(upcast_candidates(nn.Sequential(layer))) == 1 and type(layer) is UpcastLinear
    assert layer.weight_t.shape == (64, 48) and layer.weight_t.dtype == torch.float32
    assert "weight_t" not in layer.state_dict()  # never saved: rebuilt from the 16-bit weight
    x = torch.randn(MAX_HALF_ROWS, 64).to(torch.bfloat16)
    assert torch.equal(layer(x), plain(x))  # decode rows: the 16-bit path, bit for bit
    x = torch.randn(2, 5, 64).to(torch.bfloat16)  # 10 rows: fp32 product, one rounding to bf16
    ref = F.linear(x.float(), plain.weight.float(), None if plain.bias is None else plain.bias.float())
    out = layer(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0, rtol=2**-8)  # half a bf16 ulp


def test_only_plain_16bit_linears_are_upcast():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.float16), nn.Linear(8, 8).to(torch.bfloat16))
    assert upcast_linears(upcast_candidates(model)) == 2
    assert [type(m) for m in model] == [nn.Linear, UpcastLinear, UpcastLinear]


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16") / "llama"
    build_tiny_model("llama", path, dtype=torch.bfloat16)
    return str(path)


def test_engine_upcast_on_and_off(bf16_llama):
    on = Engine(bf16_llama, device="cpu", cpu_upcast=True, num_kv_blocks=64)
    off = Engine(bf16_llama, device="cpu", cpu_upcast=False, num_kv_blocks=64)
    try:
        assert on.loaded.cpu_upcast and on.runner.attention_dtype == torch.float32
        assert off.loaded.num_upcast_linears == 0 and off.runner.attention_dtype is None
        linears = [m for m in on.loaded.model.modules() if isinstance(m, UpcastLinear)]
        assert on.loaded.num_upcast_linears == len(linears) > 0
        assert "UpcastLinear (fp32 copy for CPU matmuls)" in on.describe()["swapped"]
        extra = sum(m.weight.numel() * 4 + (0 if m.bias is None else m.bias.numel() * 4) for m in linears)
        assert on.weights_bytes == off.weights_bytes + extra  # the fp32 copies are counted
        assert on.loaded.decode_weight_bytes == off.weights_bytes  # a 1-row decode reads the 16-bit weights
        params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
        a = on.generate("the cat sat on", params)[0]
        b = off.generate("the cat sat on", params)[0]
        assert len(a.token_ids) == len(b.token_ids) == 12
        on.check_invariants()
    finally:
        on.close()
        off.close()
