"""compressed-tensors checkpoints, written by the compressed-tensors package itself (independent writer).

Needs `pip install compressed-tensors` (test-only; pure python); the test module is skipped without it.
"""

from __future__ import annotations

import pytest
import torch

from backend.quantization import resolve_quantization
from backend.quantization.compressed_tensors import CTFp8Linear, CTIntLinear
from backend.tools.export_quantized import compressed_tensors_tensors, quantize_int
from tests.quantization.common import build, check_forward, fused_equals_separate, load

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402


def ct_checkpoint(w: torch.Tensor, args: QuantizationArgs, fmt: str, compressor):
    """(checkpoint tensors, dequantized weight, hf quantization_config) as compressed-tensors writes them."""
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    n, k = w.shape
    if args.strategy == "group":
        view = w.view(n, k // args.group_size, args.group_size)
        lo, hi = view.amin(-1), view.amax(-1)
    elif args.strategy == "channel":
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    else:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    scale, zp = calculate_qparams(lo, hi, args)
    state = {
        "weight": w,
        "weight_scale": scale,
        "weight_zero_point": zp.to(torch.float8_e4m3fn if args.type == "float" else torch.int8),
    }
    tensors = compressor.compress(state, scheme)
    dequant = compressor.decompress(dict(tensors), scheme)["weight"]
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed", ignore=["lm_head"]
    ).model_dump()
    return dict(tensors), dequant, config


INT_CASES = [
    (4, "group", 32, True),
    (4, "group", 32, False),
    (4, "channel", None, True),
    (8, "channel", None, True),
    (8, "group", 64, False),
]


@pytest.mark.parametrize("bits,strategy,group,sym", INT_CASES)
def test_pack_quantized(bits, strategy, group, sym):
    torch.manual_seed(0)
    w = torch.randn(64, 128, dtype=torch.bfloat16) * 0.1
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy=strategy, group_size=group)
    tensors, dequant, config = ct_checkpoint(w, args, "pack-quantized", PackedQuantizationCompressor)
    method = resolve_quantization(None, {"quantization_config": config})
    assert method.skip("lm_head") and not method.skip("model.layers.0.mlp.up_proj")
    m = load(build(method, 128, 64), tensors, torch.bfloat16)
    assert isinstance(m, CTIntLinear)
    # compressed-tensors dequantizes (q - zp) * scale in the scale dtype (bf16): one rounding of the exact product,
    # the same as ours (exact in fp32) cast to bf16.
    ours = m.dequantize()
    if m.kernel == "cpu_int4pack":  # the kernel folds zeros into a bf16 offset: not bit-exact, one rounding off
        torch.testing.assert_close(ours, dequant.float(), rtol=2e-2, atol=1e-3)
        exact = load(build(method, 128, 64), tensors, torch.float32)
        assert torch.equal(exact.dequantize().to(torch.bfloat16), dequant)
    else:
        assert torch.equal(ours.to(torch.bfloat16), dequant)
    check_forward(m, torch.bfloat16)
    check_forward(load(build(method, 128, 64), tensors, torch.float16), torch.float16)


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_float_quantized_fp8(strategy):
    torch.manual_seed(0)
    w = torch.randn(64, 128, dtype=torch.bfloat16) * 0.1
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
    tensors, dequant, config = ct_checkpoint(w, args, "float-quantized", FloatQuantizationCompressor)
    tensors.pop("weight_zero_point", None)
    m = load(build(resolve_quantization(None, {"quantization_config": config}), 128, 64), tensors, torch.bfloat16)
    assert isinstance(m, CTFp8Linear) and m.kernel == "torch"
    assert torch.equal(m.dequantize().to(torch.bfloat16), dequant)
    check_forward(m, torch.bfloat16)


def test_our_saver_round_trip_and_fused_shards():
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "g": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32},
            }
        },
    }
    method = resolve_quantization(None, {"quantization_config": config})
    ws = [torch.randn(n, 128) * 0.1 for n in (64, 32)]
    shards = [compressed_tensors_tensors(quantize_int(w, 4, 32, False, torch.bfloat16)) for w in ws]
    fused_equals_separate(method, shards, [64, 32], 128)
    method.set_kernel("torch")  # the exact path (the CPU int4 kernel folds zeros into a float offset)
    m = load(build(method, 128, 64), shards[0])
    assert torch.equal(m.dequantize(), quantize_int(ws[0], 4, 32, False, torch.bfloat16).dequantize())


def test_targets_and_ignore():
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "ignore": ["lm_head", "re:.*mlp.gate$"],
        "config_groups": {
            "attn": {"targets": ["re:.*self_attn.*"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}},
            "rest": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32},
            },
        },
    }
    method = resolve_quantization(None, {"quantization_config": config})
    assert method.scheme_for("model.layers.0.self_attn.q_proj").bits == 8
    assert method.scheme_for("model.layers.0.mlp.up_proj").bits == 4
    assert method.skip("model.layers.0.mlp.gate") and method.skip("hf.lm_head")
    assert not method.skip("model.layers.0.mlp.gate_proj")
