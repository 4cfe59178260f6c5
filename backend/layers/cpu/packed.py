"""16-bit linears on CPUs with native bf16/fp16 matmul (AVX512-BF16, AMX): weights prepacked for oneDNN.

`F.linear` on a bf16 weight hands oneDNN a plain `(N, K)` matrix, which it reorders into its blocked
layout on every call. `torch.ops.mkldnn._reorder_linear_weight` does that reorder once at load time (the
same prepacking torch.compile's CPU freezing pass uses) and `_linear_pointwise` multiplies by the packed
weight directly. Results are bit for bit those of `F.linear` (checked in tests/models/test_cpu_linear.py).

Measured on a 2-core Sapphire Rapids VM (AMX), the 30 layers of a SmolLM2-135M-shaped model, bf16:

    rows           1      4     16     64    512
    F.linear     22.0   24.8   23.8   30.4   79.1 ms
    packed       16.4   16.5   18.0   21.9   76-84 ms

The packed tensor replaces the plain weight (it converts back exactly with `.to_dense()`), so packing
costs no memory; a weight shared with another module (a tied `lm_head`) keeps the shared plain tensor and
gets a packed copy.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

PACK_ROWS_HINT = 16  # oneDNN picks the blocked layout for about this many rows (decode batches)


@functools.cache
def packing_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True when this torch build and CPU can prepack `dtype` linears for oneDNN (x86/aarch64 CPU builds do for
    bf16; fp16 needs AVX512-FP16 or AVX-NE-CONVERT, and oneDNN refuses it elsewhere)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        w = torch.ones(8, 8, dtype=dtype)
        return bool(packed_linear(torch.ones(1, 8, dtype=dtype), pack_weight(w)).eq(8).all())
    except RuntimeError:
        return False


def pack_weight(weight: torch.Tensor) -> torch.Tensor:  # (N, K) plain -> (N, K) in oneDNN's blocked layout
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with the weight from `pack_weight`: (..., K) -> (..., N), bit for bit."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def can_pack(weight: torch.Tensor) -> bool:
    """A 16-bit CPU tensor whose dtype oneDNN prepacks here (fp32 weights are left to F.linear, bit-equal to HF)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.bfloat16, torch.float16)
        and packing_available(weight.dtype)
    )


def pack_stacked(module: nn.Module, name: str, transposed: bool = False) -> list[torch.Tensor]:
    """MoE experts' stacked weights `module.<name>`, (E, N, K) or (E, K, N) when `transposed`, packed one expert
    at a time. Each packed tensor becomes a buffer `<name>_packed_<e>` and the parameter a meta placeholder of the
    same shape, so memory holds one copy and the parameter count still sees it. Returns the packed tensors."""
    stacked = getattr(module, name)
    packed = []
    for e in range(stacked.shape[0]):
        weight = stacked[e].detach()
        packed.append(pack_weight((weight.t() if transposed else weight).contiguous()))
        module.register_buffer(f"{name}_packed_{e}", packed[-1], persistent=False)
    setattr(module, name, nn.Parameter(torch.empty_like(stacked, device="meta"), requires_grad=False))
    return packed


class PackedLinear(nn.Module):
    """A 16-bit linear whose weight is held in oneDNN's blocked layout (a non-persistent mkldnn buffer)."""

    packed: torch.Tensor  # (N, K) logical shape, oneDNN blocked layout

    def __init__(self, linear: nn.Linear, shared_weight: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", pack_weight(weight), persistent=False)
        self.bias = linear.bias
        # a plain weight shared with another module (tied embeddings) stays a parameter here too
        self.shared_weight = linear.weight if shared_weight else None

    @property
    def packed_numel(self) -> int:
        """Parameters this module stands for that are not nn.Parameters (for describe's parameter count)."""
        return 0 if self.shared_weight is not None else self.in_features * self.out_features

    @property
    def weight(self) -> torch.Tensor:  # (N, K) plain tensor, for introspection (copies unless shared)
        return self.shared_weight if self.shared_weight is not None else self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        return packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"oneDNN packed{', tied weight kept' if self.shared_weight is not None else ''}"
        )


def pack_linears(model: nn.Module, modules: list[nn.Linear]) -> int:
    """Replace each of `modules` (children of `model`, from `half_linears`) by a PackedLinear, in place."""
    targets = {id(m) for m in modules}
    uses: dict[int, int] = {}  # storage -> modules holding it (tied weights may be one Parameter or two)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            uses[p.data_ptr()] = uses.get(p.data_ptr(), 0) + 1
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                setattr(parent, name, PackedLinear(child, shared_weight=uses[child.weight.data_ptr()] > 1))
                count += 1
    return count
