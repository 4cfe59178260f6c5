"""Gated activations `act(gate) * up` on a fused (gate | up) projection, with transformers' numerics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backend.core.errors import UnsupportedModelError
from backend.layers._kernels import triton_kernel

# transformers' `hidden_act` names -> our gated activation (only the ones whose HF math we reproduce exactly)
ACTIVATIONS: dict[str, str] = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
}


def resolve_activation(hidden_act: str) -> str:
    if hidden_act not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"activation {hidden_act!r} has no native implementation (supported: {sorted(ACTIVATIONS)}); "
            "use model_impl='transformers'"
        )
    return ACTIVATIONS[hidden_act]


def act_and_mul(x: torch.Tensor, kind: str) -> torch.Tensor:  # (..., 2I) -> (..., I)
    if kind == "silu":
        kernel = triton_kernel("silu_and_mul", x)
        if kernel is not None:
            return kernel(x)
    else:
        approximate = "tanh" if kind == "gelu_tanh" else "none"
        kernel = triton_kernel("gelu_and_mul", x)
        if kernel is not None:
            return kernel(x, approximate=approximate)
    d = x.shape[-1] // 2
    gate, up = x[..., :d], x[..., d:]
    if kind == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh" if kind == "gelu_tanh" else "none") * up
