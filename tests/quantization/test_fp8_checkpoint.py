"""FP8 checkpoints (quant_method fp8): block-wise weight_scale_inv, per-tensor and per-channel weight_scale."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from backend.core.errors import QuantizationError
from backend.quantization import resolve_quantization
from backend.tools.export_quantized import fp8_block_tensors
from tests.quantization.common import build, check_forward, fused_equals_separate, load


def block_method(block=(32, 32)):
    return resolve_quantization(
        None,
        {
            "quantization_config": {
                "quant_method": "fp8",
                "activation_scheme": "dynamic",
                "weight_block_size": list(block),
                "modules_to_not_convert": ["mlp.gate"],
            }
        },
    )


def independent_block_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block) -> torch.Tensor:
    n, k = weight.shape
    out = torch.empty(n, k)
    for i in range(n):
        for j in range(0, k, 8):
            out[i, j : j + 8] = weight[i, j : j + 8].float() * scale_inv[i // block[0], j // block[1]]
    return out


@pytest.mark.parametrize("shape", [(64, 128), (40, 72)])  # the second has partial blocks on both dims
def test_block_wise(tmp_path, shape):
    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.1
    save_file(fp8_block_tensors(w, (32, 32)), str(tmp_path / "fp8.safetensors"))
    tensors = load_file(str(tmp_path / "fp8.safetensors"))
    m = load(build(block_method(), shape[1], shape[0]), tensors, torch.bfloat16)
    expected = independent_block_dequant(tensors["weight"], tensors["weight_scale_inv"], (32, 32))
    assert torch.equal(m.dequantize(), expected)  # round trip through our saver is exact
    assert ((expected - w).abs() <= w.abs() * 2**-4 + 1e-6).all()  # e4m3 rounding bound (no subnormals here)
    assert "group=32" in repr(m)
    check_forward(m, torch.bfloat16)
    check_forward(load(build(block_method(), shape[1], shape[0]), tensors, torch.float32), torch.float32)


def test_per_tensor_and_per_channel_scales():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 0.1
    scale = w.abs().max() / 448
    per_tensor = {
        "weight": (w / scale).to(torch.float8_e4m3fn),
        "weight_scale": scale.reshape(()),
        "input_scale": torch.tensor(0.02),
    }
    method = resolve_quantization(None, {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}})
    m = load(build(method, 64, 32), per_tensor)
    assert torch.equal(m.dequantize(), per_tensor["weight"].float() * scale)
    ch_scale = w.abs().amax(1, keepdim=True) / 448
    per_channel = {"weight": (w / ch_scale).to(torch.float8_e4m3fn), "weight_scale": ch_scale}
    m = load(build(method, 64, 32), per_channel)
    assert torch.equal(m.dequantize(), per_channel["weight"].float() * ch_scale)
    check_forward(m, torch.float32)


def test_fused_shards_per_tensor_and_block():
    """Per-tensor scales of q/k/v shards cannot be concatenated as such: merge_shards makes them per-channel."""
    torch.manual_seed(0)
    method = resolve_quantization(None, {"quantization_config": {"quant_method": "fp8"}})
    shards = []
    for n in (32, 16):
        w = torch.randn(n, 64) * (0.1 * n)
        s = w.abs().max() / 448
        shards.append(
            {
                "weight": (w / s).to(torch.float8_e4m3fn),
                "weight_scale": s.reshape(()),
                "input_scale": torch.tensor(0.01 * n),
            }
        )
    fused_equals_separate(method, shards, [32, 16], 64)
    assert build(method, 64, 48).merge_shards("input_scale", [s["input_scale"] for s in shards], [32, 16]) == 0.32
    blocks = [fp8_block_tensors(torch.randn(n, 64) * 0.1, (16, 32)) for n in (32, 16)]
    fused_equals_separate(block_method((16, 32)), blocks, [32, 16], 64)
    with pytest.raises(QuantizationError, match="multiple of the block height"):
        fused_equals_separate(block_method((32, 32)), blocks, [32, 16], 64)


def test_errors():
    method = block_method()
    assert method.skip("model.layers.0.mlp.gate") and method.skip("lm_head")
    m = build(method, 64, 32, prefix="model.layers.0.self_attn.o_proj")
    with pytest.raises(QuantizationError, match="float8_e5m2"):
        m.load_tensor("weight", torch.zeros(32, 64, dtype=torch.float8_e5m2), torch.device("cpu"), torch.float32)
    m = build(method, 64, 32, prefix="o_proj")
    m.load_tensor("weight", torch.zeros(32, 64, dtype=torch.float8_e4m3fn), torch.device("cpu"), torch.float32)
    with pytest.raises(QuantizationError, match="o_proj.*no weight_scale_inv"):
        m.finalize()
    m = build(method, 64, 32)
    m.load_tensor("weight", torch.zeros(32, 64, dtype=torch.float8_e4m3fn), torch.device("cpu"), torch.float32)
    m.load_tensor("weight_scale_inv", torch.ones(2, 3), torch.device("cpu"), torch.float32)
    with pytest.raises(QuantizationError, match=r"shape \(2, 3\)"):
        m.finalize()
