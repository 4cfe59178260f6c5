"""GPTQ checkpoints against an independent writer (AutoGPTQ's packing loops, rewritten here in numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backend.core.errors import QuantizationError
from backend.quantization import resolve_quantization
from backend.tools.export_quantized import linear_tensors, quantize_int
from tests.quantization.common import build, check_forward, fused_equals_separate, load


def reference_gptq(w: torch.Tensor, bits: int, group: int, sym: bool, v1: bool, perm: torch.Tensor | None = None):
    """Quantize like AutoGPTQ's Quantizer (min/max, RTN) and pack like its QuantLinear.pack:
    returns checkpoint tensors and the weight they encode, computed independently of the package."""
    n, k = w.shape
    maxq = 2**bits - 1
    g_idx = (torch.arange(k) // group).int()
    if perm is not None:  # desc_act: column perm[i] is the i-th quantized column
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // group).int()
    num_groups = k // group
    scale = np.zeros((num_groups, n), np.float16)
    zero = np.zeros((num_groups, n), np.int64)
    for gi in range(num_groups):
        cols = (g_idx == gi).nonzero().flatten()
        x = w[:, cols].double().numpy()  # (N, group)
        xmin, xmax = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
        if sym:
            xmax = np.maximum(np.abs(xmin), xmax)
            xmin = np.where(xmin < 0, -xmax, xmin)
        s = ((xmax - xmin) / maxq).astype(np.float16)
        s = np.where(s == 0, np.float16(1), s)
        scale[gi] = s
        zero[gi] = np.full(n, (maxq + 1) // 2) if sym else np.round(-xmin / s.astype(np.float64))
    s_k = scale.astype(np.float64)[g_idx.numpy()].T  # (N, K)
    z_k = zero[g_idx.numpy()].T
    intweight = np.clip(np.round(w.double().numpy() / s_k) + z_k, 0, maxq).astype(np.uint32)  # (N, K)
    expected = (intweight.astype(np.float64) - z_k) * s_k

    per = 32 // bits
    iw = intweight.T  # (K, N)
    qweight = np.zeros((k // per, n), np.uint32)
    i, row = 0, 0
    while row < qweight.shape[0]:
        for j in range(i, i + per):
            qweight[row] |= iw[j] << (bits * (j - i))
        i += per
        row += 1
    zeros = (zero - 1) if v1 else zero
    zeros = (zeros & maxq).astype(np.uint32)
    qzeros = np.zeros((num_groups, n // per), np.uint32)
    i, col = 0, 0
    while col < qzeros.shape[1]:
        for j in range(i, i + per):
            qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
        i += per
        col += 1
    tensors = {
        "qweight": torch.from_numpy(qweight.view(np.int32)),
        "qzeros": torch.from_numpy(qzeros.view(np.int32)),
        "scales": torch.from_numpy(scale),
        "g_idx": g_idx,
    }
    return tensors, torch.from_numpy(expected).float()


def gptq_method(bits=4, group=32, sym=True, fmt="gptq", desc_act=False, kernel=None):
    method = resolve_quantization(
        None,
        {
            "quantization_config": {
                "quant_method": "gptq",
                "bits": bits,
                "group_size": group,
                "sym": sym,
                "desc_act": desc_act,
                "checkpoint_format": fmt,
            }
        },
    )
    if kernel:
        method.set_kernel(kernel)
    return method


CASES = [(4, True, "gptq"), (4, False, "gptq"), (4, False, "gptq_v2"), (8, True, "gptq"), (8, False, "gptq_v2")]


@pytest.mark.parametrize("bits,sym,fmt", CASES)
@pytest.mark.parametrize("desc_act", [False, True])
def test_against_independent_writer(bits, sym, fmt, desc_act):
    torch.manual_seed(0)
    n, k, group = 64, 128, 32
    w = torch.randn(n, k) * 0.1
    perm = torch.randperm(k) if desc_act else None
    tensors, expected = reference_gptq(w, bits, group, sym, v1=fmt == "gptq", perm=perm)
    exact = load(build(gptq_method(bits, group, sym, fmt, desc_act, kernel="torch"), k, n), tensors)
    torch.testing.assert_close(exact.dequantize(), expected, rtol=0, atol=1e-7)
    # the CPU pack kernels serve 16-bit activations (fp32 ones take the torch path: faster there)
    fast = load(build(gptq_method(bits, group, sym, fmt, desc_act), k, n), tensors, torch.float16)
    want = {(4, True): "cpu_int4pack", (4, False): "cpu_int4pack", (8, True): "torch", (8, False): "torch"}
    assert fast.kernel == want[(bits, sym)]
    assert load(build(gptq_method(bits, group, sym, fmt, desc_act), k, n), tensors).kernel == "torch"  # fp32
    # fp16 scales as in the checkpoint; the pack kernel folds zeros into an fp16 offset -z*s (|z*s| < 0.5:
    # one fp16 rounding, <= 2^-12)
    torch.testing.assert_close(fast.dequantize(), expected, rtol=0, atol=2**-12)
    assert (fast.w_perm is not None) == desc_act  # act-order: columns permuted once, groups contiguous
    for dtype in (torch.float32, torch.bfloat16):
        check_forward(load(build(gptq_method(bits, group, sym, fmt, desc_act), k, n), tensors, dtype), dtype)


def test_8bit_per_channel_symmetric_uses_int8_fast_path():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.1
    tensors, expected = reference_gptq(w, 8, 64, True, v1=True)
    m = load(build(gptq_method(8, -1, True), 64, 48), tensors, torch.float16)
    assert m.kernel == "cpu_int8pack" and "channel" in repr(m)
    torch.testing.assert_close(m.dequantize(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
def test_round_trip_through_our_saver(tmp_path, fmt, sym):
    torch.manual_seed(1)
    w = torch.randn(64, 128) * 0.1
    perm = torch.randperm(128)
    tensors = linear_tensors("gptq", w, bits=4, group_size=32, symmetric=sym, checkpoint_format=fmt, act_order=perm)
    save_file(tensors, str(tmp_path / "layer.safetensors"))
    m = load(
        build(gptq_method(4, 32, sym, fmt, True, kernel="torch"), 128, 64),
        load_file(str(tmp_path / "layer.safetensors")),
    )
    qz = quantize_int(w, 4, 32, sym, torch.float16, act_order=perm)
    assert torch.equal(m.dequantize(), qz.dequantize())


def test_on_the_fly_int4_equals_exported_gptq():
    """int4 on the fly and GPTQ v2 of the same quantization give the same weights bit for bit."""
    w = (torch.randn(64, 128) * 0.1).half()
    int4 = load(build(resolve_quantization("int4:g32,kernel=torch", {}), 128, 64), {"weight": w}, torch.float16)
    gptq = load(
        build(gptq_method(4, 32, False, "gptq_v2", kernel="torch"), 128, 64),
        linear_tensors("gptq", w, 4, 32, symmetric=False, checkpoint_format="gptq_v2"),
        torch.float16,
    )
    assert torch.equal(int4.dequantize(), gptq.dequantize())


def test_fused_shards():
    torch.manual_seed(2)
    perm = torch.randperm(128)  # shards share the input, hence the act-order permutation
    shards = [linear_tensors("gptq", torch.randn(n, 128) * 0.1, 4, 32, False, "gptq", act_order=perm) for n in (64, 32)]
    method = gptq_method(4, 32, False, "gptq", True)
    fused_equals_separate(method, shards, [64, 32], 128)
    assert build(method, 128, 96).output_dim("g_idx") is None


def test_errors():
    tensors, _ = reference_gptq(torch.randn(64, 128), 4, 32, True, v1=True)
    m = build(gptq_method(), 128, 64, prefix="model.layers.0.self_attn.q_proj")
    with pytest.raises(QuantizationError, match=r"layer \(gptq\).*'qweight' has shape \(16, 64\), expected \(16, 32\)"):
        build(gptq_method(), 128, 32).load_tensor("qweight", tensors["qweight"], torch.device("cpu"), torch.float32)
    m.load_tensor("qweight", tensors["qweight"], torch.device("cpu"), torch.float32)
    with pytest.raises(QuantizationError, match=r"model.layers.0.self_attn.q_proj \(gptq\).*\['qzeros', 'scales'\]"):
        m.finalize()
    with pytest.raises(ValueError, match="gptq_v2"):
        linear_tensors("gptq", torch.rand(16, 32), 4, 32, symmetric=False, checkpoint_format="gptq")  # zero code 0
