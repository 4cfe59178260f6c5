"""Gated activations `act(gate) * up` on a fused (gate | up) projection, with transformers' numerics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


@dataclass(frozen=True)
class KernelActivation:
    """A gated activation that a kernel of the model's device runs (the C++ CPU SiLU-and-mul, backend/layers/cpu):
    `fn(x)` is the result, or None for inputs it does not take, which then run `kind`'s own math. Set as a
    module's `act` at load (a plain `str` otherwise)."""

    kind: str
    fn: Callable[[torch.Tensor], torch.Tensor | None]


def act_and_mul(x: torch.Tensor, kind: str | KernelActivation) -> torch.Tensor:  # (..., 2I) -> (..., I)
    if isinstance(kind, KernelActivation):
        out = kind.fn(x)
        if out is not None:
            return out
        kind = kind.kind
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
