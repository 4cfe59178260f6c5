"""Helpers for the quantization tests: build a quantized linear on meta and load it like the loader does."""

from __future__ import annotations

import torch
from torch import nn

from backend.quantization import QuantMethod
from backend.quantization.base import QuantLinearBase

CPU = torch.device("cpu")

# Output tolerance against the dequantized reference (x @ W_dq.T in float32, W_dq = module.dequantize()):
# both use the same weights, so the difference is the rounding of activations/products/outputs in the
# activation dtype. Relative Frobenius error bounds: fp32 ~1e-7 seen -> 1e-5; fp16 (unit roundoff 2^-11)
# -> 2e-3; bf16 (unit roundoff 2^-8 = 3.9e-3, ~2.5e-3 seen on K=256) -> 1e-2.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def build(
    method: QuantMethod, in_features: int, out_features: int, bias: bool = False, prefix: str = "layer"
) -> QuantLinearBase:
    with torch.device("meta"):
        linear = nn.Linear(in_features, out_features, bias=bias)
    module = method.create_linear(linear, prefix)
    assert all(t.is_meta for t in module.buffers()) and not list(module.parameters())
    return module


def load(
    module: QuantLinearBase,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device = CPU,
) -> QuantLinearBase:
    for name, t in tensors.items():
        module.load_tensor(name, t, device, dtype)
    module.finalize()
    return module


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def check_forward(module: QuantLinearBase, dtype: torch.dtype, bias: torch.Tensor | None = None) -> None:
    x = torch.randn(2, 3, module.in_features, dtype=dtype)
    y = module(x)
    assert y.shape == (2, 3, module.out_features) and y.dtype == dtype
    ref = x.float() @ module.dequantize().t()
    if bias is not None:
        ref = ref + bias.to(dtype).float()
    assert rel_err(y, ref) < REL_TOL[dtype], (module, rel_err(y, ref))


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def fused_equals_separate(
    method: QuantMethod,
    shard_tensors: list[dict[str, torch.Tensor]],
    sizes: list[int],
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Merging shards' checkpoint tensors with merge_shards (cat along output_dim) == loading each shard."""
    fused = build(method, in_features, sum(sizes), prefix="fused")
    for name in shard_tensors[0]:
        fused.load_tensor(name, fused.merge_shards(name, [t[name] for t in shard_tensors], sizes), CPU, dtype)
    fused.finalize()
    parts = [
        load(build(method, in_features, n, prefix=f"shard{i}"), t, dtype)
        for i, (t, n) in enumerate(zip(shard_tensors, sizes))
    ]
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    x = torch.randn(4, in_features, dtype=dtype)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=1e-5, atol=1e-5)
