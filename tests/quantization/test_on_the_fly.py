"""int8 / int4 / fp8 on-the-fly quantization: error bounds, outputs, bytes, fused shards."""

from __future__ import annotations

import pytest
import torch

from backend.core.errors import QuantizationError
from backend.quantization import resolve_quantization
from backend.tools.export_quantized import quantize_int
from tests.quantization.common import build, check_forward, fused_equals_separate, load, weight_bytes

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8(dtype):
    w, b = make_weight(64, 256), torch.randn(64)
    m = load(build(resolve_quantization("int8", {}), 256, 64, bias=True), {"weight": w.to(dtype), "bias": b}, dtype)
    # torch._weight_int8pack_mm for 16-bit activations; with fp32 ones dequantize + fp32 matmul is faster
    assert m.kernel == ("torch" if dtype == torch.float32 else "cpu_int8pack")
    wq = m.dequantize()
    scale = w.to(dtype).float().abs().amax(1, keepdim=True) / 127  # symmetric per channel: error <= scale / 2
    assert ((wq - w.to(dtype).float()).abs() <= scale * 0.5 * (1 + 1e-2) + 1e-7).all()
    check_forward(m, dtype, b)
    assert "bits=8" in repr(m) and "channel" in repr(m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4(dtype, group):
    w, b = make_weight(64, 256), torch.randn(64)
    m = load(
        build(resolve_quantization(f"int4:g{group}", {}), 256, 64, bias=True), {"weight": w.to(dtype), "bias": b}, dtype
    )
    assert m.kernel == ("torch" if dtype == torch.float32 else "cpu_int4pack") and m.group_size == group
    wq = m.dequantize()
    wg = w.to(dtype).float().view(64, -1, group)
    scale = (wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)) / 15  # asymmetric: error <= scale
    err = (wq - w.to(dtype).float()).view(64, -1, group).abs()
    assert (err <= scale[..., None] * (1 + 2e-2) + 1e-6).all()
    check_forward(m, dtype, b)
    assert f"group={group}" in repr(m) and "bits=4" in repr(m)


def test_int4_reference_path_for_odd_shapes():
    w = make_weight(24, 80)  # N % 16 != 0 and no allowed group divides 80: one group per row, torch path
    m = load(build(resolve_quantization("int4", {}), 80, 24), {"weight": w})
    assert m.kernel == "torch" and m.group_size == 80
    check_forward(m, torch.float32)
    exact = quantize_int(w, 4, 80, symmetric=False, scale_dtype=torch.float32)
    assert torch.equal(m.dequantize(), exact.dequantize())


def test_int4_fast_path_matches_torch_path():
    w = make_weight(64, 256)
    bf16 = torch.bfloat16
    fast = load(build(resolve_quantization("int4:g64", {}), 256, 64), {"weight": w}, bf16)
    ref = load(build(resolve_quantization("int4:g64,kernel=torch", {}), 256, 64), {"weight": w}, bf16)
    assert (fast.kernel, ref.kernel) == ("cpu_int4pack", "torch")
    # the pack kernel folds zeros into a bf16 offset -z*s (|z*s| < 0.25 here): one bf16 rounding, <= 2^-11
    torch.testing.assert_close(fast.dequantize(), ref.dequantize(), rtol=0, atol=2**-9)
    x = torch.randn(5, 256).to(bf16)
    torch.testing.assert_close(fast(x).float(), ref(x).float(), rtol=2**-6, atol=2**-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8(dtype):
    w = make_weight(64, 256)
    m = load(build(resolve_quantization("fp8", {}), 256, 64), {"weight": w.to(dtype)}, dtype)
    assert m.kernel == "torch" and "weight-only" in repr(m)  # CPU: no fp8 matmul
    wq, wt = m.dequantize(), w.to(dtype).float()
    scale = wt.abs().amax(1, keepdim=True) / 448
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 for normals, absolute <= scale * 2^-10 for subnormals
    assert ((wq - wt).abs() <= wt.abs() * 2**-4 + scale * 2**-9).all()
    check_forward(m, dtype)


def test_weight_bytes():
    n, k = 256, 1024
    bf16 = n * k * 2
    int8 = load(build(resolve_quantization("int8", {}), k, n), {"weight": make_weight(n, k)}, torch.bfloat16)
    int4 = load(build(resolve_quantization("int4", {}), k, n), {"weight": make_weight(n, k)}, torch.bfloat16)
    fp8 = load(build(resolve_quantization("fp8", {}), k, n), {"weight": make_weight(n, k)}, torch.bfloat16)
    assert 0.5 <= weight_bytes(int8) / bf16 <= 0.5 + 1 / k + 1e-9  # + one bf16 scale per row
    assert 0.25 <= weight_bytes(int4) / bf16 <= 0.25 + 2 / 128 + 1e-9  # + bf16 scale and zero per group of 128
    assert 0.5 <= weight_bytes(fp8) / bf16 <= 0.5 + 2 / k + 1e-9  # + one fp32 scale per row


def test_full_precision_weight_is_not_kept():
    m = load(build(resolve_quantization("int8", {}), 64, 32), {"weight": make_weight(32, 64)}, torch.bfloat16)
    assert {n for n, b in m.named_buffers()} == {"w_q", "w_scales"}
    assert all(b.dtype != torch.float32 for b in m.buffers())


@pytest.mark.parametrize("request_", ["int8", "int4:g32", "fp8", "int4:g32,kernel=torch"])
def test_fused_shards(request_):
    shards = [{"weight": make_weight(32, 128, 1)}, {"weight": make_weight(16, 128, 2)}]
    fused_equals_separate(resolve_quantization(request_, {}), shards, [32, 16], 128)


def test_load_errors():
    m = build(resolve_quantization("int8", {}), 64, 32, prefix="model.layers.0.mlp.up_proj")
    with pytest.raises(QuantizationError, match=r"model.layers.0.mlp.up_proj.*shape \(32, 32\)"):
        m.load_tensor("weight", torch.zeros(32, 32), torch.device("cpu"), torch.float32)
    with pytest.raises(QuantizationError, match="unexpected checkpoint tensor 'qweight'"):
        m.load_tensor("qweight", torch.zeros(32, 32), torch.device("cpu"), torch.float32)
    with pytest.raises(QuantizationError, match=r"model.layers.0.mlp.up_proj \(int8\).*\['weight'\] were not found"):
        m.finalize()
    with pytest.raises(QuantizationError, match="before finalize"):
        m(torch.zeros(1, 64))
    b = build(resolve_quantization("int4", {}), 64, 32, bias=True, prefix="o")
    b.load_tensor("weight", make_weight(32, 64), torch.device("cpu"), torch.float32)
    with pytest.raises(QuantizationError, match=r"\['bias'\]"):
        b.finalize()
