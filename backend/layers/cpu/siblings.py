"""Sibling linears of a transformers model (q/k/v, gate/up) multiplied as one oneDNN product on CPU.

Native models fuse these projections when they load. A transformers model calls `q_proj(x)`, `k_proj(x)`,
`v_proj(x)` one after the other on the same `x`; for a decode step each is a small GEMV whose fixed cost
is a large part of its time. `fuse_siblings` replaces such PackedLinears (backend/layers/cpu/packed.py) by
SiblingLinears sharing one packed `[W_q; W_k; W_v]`: the first sibling computes `[y_q | y_k | y_v]`, the
others return their slice when they get the very same input tensor (else they compute it again, so a
model that calls them differently still gets correct results). The last sibling drops the reference to
the product, so no activation outlives its layer.

Measured on the 2-core AMX VM, SmolLM2-135M shape, transformers implementation, interleaved in one
process: a batch-1 decode step 27.4 ms against 30.4 with separate products, batch 16 41.4 against 44.4.
Decode-sized products are bit for bit those of the separate linears; for prompts of thousands of tokens
oneDNN may block the wider product differently, which can change the last bf16 bit of some outputs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from backend.layers.cpu.packed import PackedLinear, pack_weight, packed_linear

SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SiblingProduct:
    """The shared weight and the last product of one sibling group (a plain object: no module state)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed = pack_weight(weight)  # (sum N, K) blocked
        self.bias = bias
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None  # (..., sum N) for `input`
        # our C++ GEMV for few rows (backend/layers/cpu/fused.py FusedProduct: None = not its case), else None
        self.fused: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fused(x) if self.fused is not None else None
        self.input, self.output = x, packed_linear(x, self.packed, self.bias) if out is None else out
        return self.output


class SiblingLinear(nn.Module):
    """One projection of a sibling group: columns `lo:hi` of the shared product."""

    def __init__(self, product: SiblingProduct, lo: int, hi: int, in_features: int, first: bool, last: bool) -> None:
        super().__init__()
        self.product = product
        self.lo, self.hi = lo, hi
        self.in_features, self.out_features = in_features, hi - lo
        self.first, self.last = first, last
        if first:  # the group's tensors are registered once, so weight-byte counts see them once (CPU only)
            self.register_buffer("packed", product.packed, persistent=False)
            self.register_buffer("fused_bias", product.bias, persistent=False)

    @property
    def packed_numel(self) -> int:
        """Parameters this module stands for that are not nn.Parameters (for describe's parameter count)."""
        return self.out_features * (self.in_features + (self.product.bias is not None))

    @property
    def weight(self) -> torch.Tensor:  # (N, K) plain copy, for introspection
        return self.product.packed.to_dense()[self.lo : self.hi]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.product.bias is None else self.product.bias[self.lo : self.hi]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        p = self.product
        out = p(x) if self.first or p.input is not x else p.output
        if self.last:
            p.input = p.output = None
        return out[..., self.lo : self.hi]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, columns {self.lo}:{self.hi} "
            f"of one oneDNN product"
        )


def fuse_siblings(model: nn.Module) -> int:
    """Replace each complete q/k/v or gate/up group of PackedLinears (same input size, all with or all without
    bias, no tied weight) by SiblingLinears, in place; returns how many linears were replaced."""
    count = 0
    for parent in list(model.modules()):
        for names in SIBLING_NAMES:
            group = [getattr(parent, name, None) for name in names]
            if not all(isinstance(m, PackedLinear) and m.shared_weight is None for m in group):
                continue
            if len({m.in_features for m in group}) != 1 or len({m.bias is None for m in group}) != 1:
                continue
            weight = torch.cat([m.packed.to_dense() for m in group])  # (sum N, K)
            bias = None if group[0].bias is None else torch.cat([m.bias.detach() for m in group])
            product = SiblingProduct(weight, bias)
            lo = 0
            for i, (name, m) in enumerate(zip(names, group)):
                setattr(
                    parent,
                    name,
                    SiblingLinear(
                        product, lo, lo + m.out_features, m.in_features, first=i == 0, last=i == len(group) - 1
                    ),
                )
                lo += m.out_features
            count += len(group)
    return count
