"""AWQ GEMM checkpoints against an independent writer (AutoAWQ's WQLinear_GEMM.from_linear packing loops)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from backend.core.errors import QuantizationError
from backend.quantization import resolve_quantization
from backend.tools.export_quantized import linear_tensors, quantize_int
from tests.quantization.common import build, check_forward, fused_equals_separate, load


def reference_awq(w: torch.Tensor, group: int):
    """AutoAWQ: pseudo_quantize_tensor (zero_point=True) + WQLinear_GEMM packing, written from the format."""
    n, k = w.shape
    wg = w.reshape(-1, group).float()
    max_val, min_val = wg.amax(dim=1, keepdim=True), wg.amin(dim=1, keepdim=True)
    scales = ((max_val - min_val).clamp(min=1e-5) / 15).half().float()
    zeros = (-torch.round(min_val / scales)).clamp(0, 15)
    intw = (torch.clamp(torch.round(wg / scales) + zeros, 0, 15)).reshape(n, k).to(torch.int32)
    scales, zeros = scales.view(n, -1), zeros.view(n, -1).to(torch.int32)  # (N, G)
    expected = (intw.float() - zeros.repeat_interleave(group, 1).float()) * scales.repeat_interleave(group, 1)

    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    intweight = intw.t().contiguous()  # (K, N)
    qweight = torch.zeros(k, n // 8, dtype=torch.int64)
    for col in range(n // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]].to(torch.int64) << (i * 4)
    zt = zeros.t().contiguous()  # (G, N)
    qzeros = torch.zeros(zt.shape[0], n // 8, dtype=torch.int64)
    for col in range(n // 8):
        for i in range(8):
            qzeros[:, col] |= zt[:, col * 8 + order_map[i]].to(torch.int64) << (i * 4)
    to_i32 = lambda t: torch.from_numpy(t.numpy().astype("uint32").view("int32"))  # noqa: E731
    return ({"qweight": to_i32(qweight), "qzeros": to_i32(qzeros), "scales": scales.t().contiguous().half()}, expected)


def awq_method(group=32, kernel=None):
    method = resolve_quantization(
        None,
        {
            "quantization_config": {
                "quant_method": "awq",
                "bits": 4,
                "group_size": group,
                "zero_point": True,
                "version": "gemm",
                "modules_to_not_convert": ["visual"],
            }
        },
    )
    if kernel:
        method.set_kernel(kernel)
    return method


def test_against_independent_writer():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.1
    tensors, expected = reference_awq(w, 32)
    exact = load(build(awq_method(kernel="torch"), 128, 64), tensors)
    torch.testing.assert_close(exact.dequantize(), expected, rtol=0, atol=1e-7)
    fast = load(build(awq_method(), 128, 64), tensors, torch.float16)  # pack kernels: 16-bit activations
    assert fast.kernel == "cpu_int4pack"
    assert load(build(awq_method(), 128, 64), tensors).kernel == "torch"  # fp32 activations: torch path
    # the pack kernel folds zeros into an fp16 offset -z*s (|z*s| < 0.5): one fp16 rounding, <= 2^-12
    torch.testing.assert_close(fast.dequantize(), expected, rtol=0, atol=2**-12)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_forward(load(build(awq_method(), 128, 64), tensors, dtype), dtype)


def test_round_trip_through_our_saver(tmp_path):
    w = torch.randn(48, 96) * 0.1
    save_file(linear_tensors("awq", w, 4, 32), str(tmp_path / "awq.safetensors"))
    m = load(build(awq_method(kernel="torch"), 96, 48), load_file(str(tmp_path / "awq.safetensors")))
    assert torch.equal(m.dequantize(), quantize_int(w, 4, 32, False, torch.float16).dequantize())


def test_fused_shards():
    shards = [linear_tensors("awq", torch.randn(n, 128) * 0.1, 4, 32) for n in (64, 32)]
    fused_equals_separate(awq_method(), shards, [64, 32], 128)
    with pytest.raises(QuantizationError, match="8 columns"):
        build(awq_method(), 128, 60).merge_shards("qweight", [torch.zeros(128, 4)] * 2, [36, 24])


def test_skip_list():
    method = awq_method()
    assert method.skip("visual.blocks.0.attn.qkv") and method.skip("lm_head")
    assert not method.skip("model.layers.0.mlp.down_proj")
