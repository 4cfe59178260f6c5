"""Rotary position embedding from a precomputed cos/sin cache indexed by positions (neox / rotate-half style).

Frequencies come from transformers' own `ROPE_INIT_FUNCTIONS`, so every rope_type it knows (llama3,
linear, yarn, longrope, dynamic, ...) gives the same `inv_freq` and `attention_scaling` as the HF model.
Cache: `cos_sin_cache[max_position, rotary_dim]` = [cos | sin] in fp32, scaled by attention_scaling.
The torch math rounds cos/sin to the activation dtype and rotates in that dtype, exactly like HF's
`q * cos + rotate_half(q) * sin`; on CUDA `flab_kernels.ops.apply_rotary` runs (fp32 math, one rounding).

longrope: the cache holds the short-factor rows [0, P) and the long-factor rows [P, 2P); like HF, which
picks the long factors for a whole forward call once it reaches past `original_max_position_embeddings`, a
sequence whose length this step exceeds it reads the long rows (`cache_positions`).
Limit: `dynamic` NTK uses its base frequencies (as HF does within the original context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from backend.core.errors import UnsupportedModelError
from backend.layers._kernels import triton_kernel


def rope_parameters(config: PretrainedConfig) -> dict:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return params
    return {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}


def rotary_dim_of(config: PretrainedConfig, head_dim: int) -> int:
    return int(head_dim * rope_parameters(config).get("partial_rotary_factor", 1.0))


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:  # (dim/2,)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def longrope_original_max(config: PretrainedConfig) -> int | None:
    params = rope_parameters(config)
    return params["original_max_position_embeddings"] if params.get("rope_type") == "longrope" else None


def compute_cos_sin_cache(config: PretrainedConfig, head_dim: int, max_position: int) -> torch.Tensor:
    """(P, rotary_dim) fp32 [cos | sin] on the CPU, computed like the HF rotary module ((2P, rd) for longrope:
    short-factor rows, then long-factor rows)."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    dim = rotary_dim_of(config, head_dim)
    with torch.device("cpu"):
        if rope_type == "default":
            inv_freq, scaling = _default_inv_freq(params["rope_theta"], dim), 1.0
            long_inv_freq = None
        elif rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
            long_inv_freq = None
            if rope_type == "longrope":
                original = params["original_max_position_embeddings"]
                long_inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), seq_len=original + 1)
        else:
            raise UnsupportedModelError(f"rope_type {rope_type!r} is unknown to transformers' ROPE_INIT_FUNCTIONS")
        t = torch.arange(max_position, dtype=torch.float)  # (P,)
        freqs = t[:, None] * inv_freq.float()[None, :]  # (P, rd/2), like HF's position.float() * inv_freq
        if long_inv_freq is not None:
            freqs = torch.cat([freqs, t[:, None] * long_inv_freq.float()[None, :]])  # (2P, rd/2)
        return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)  # (P, rd)


@dataclass
class RopeStep:
    """The rotary inputs of one step, gathered once and shared by every layer."""

    rows: torch.Tensor  # (T,) cache row of each token (its position; shifted for longrope's long factors)
    cos: torch.Tensor | None  # (T, 1, rd) [cos | cos] in the activation dtype (None when a CUDA kernel rotates)
    sin: torch.Tensor | None  # (T, 1, rd) [-sin | sin]


def rope_step(rows: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype) -> RopeStep:
    """Gather cos/sin for the step's tokens, rounded to the activation dtype as HF does."""
    if triton_kernel("apply_rotary", cos_sin_cache) is not None:  # the kernel reads the cache itself
        return RopeStep(rows, None, None)
    cos, sin = cos_sin_cache[rows].to(dtype).chunk(2, dim=-1)  # (T, rd/2) each
    return RopeStep(rows, torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None])


def _rotate(x: torch.Tensor, rope: RopeStep) -> torch.Tensor:
    # x: (T, H, D) -> (T, H, D). HF: x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2 | x1];
    # [x2 | x1] * [-sin | sin] is the same product element by element (negation is exact).
    t, h, d = x.shape
    rd = rope.cos.shape[-1]
    xr = x[..., :rd]
    swapped = xr.unflatten(-1, (2, rd // 2)).flip(-2).view(t, h, rd)  # [x2 | x1]
    out = xr * rope.cos + swapped * rope.sin
    return out if rd == d else torch.cat([out, x[..., rd:]], dim=-1)


def apply_rotary(
    q: torch.Tensor,  # (T, Hq * D)
    k: torch.Tensor,  # (T, Hkv * D)
    rope: RopeStep,
    cos_sin_cache: torch.Tensor,  # (P, rd) fp32
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (T, Hq * D), (T, Hkv * D)
    kernel = triton_kernel("apply_rotary", q)
    if kernel is not None:
        return kernel(q, k, rope.rows, cos_sin_cache, is_neox=True, head_dim=head_dim)
    t = q.shape[0]
    q = _rotate(q.view(t, -1, head_dim), rope).view(t, -1)
    k = _rotate(k.reshape(t, -1, head_dim), rope).view(t, -1)
    return q, k


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin cache (a non-persistent buffer, built on the device by `build`)."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.head_dim = head_dim
        self.max_position = max_position
        self.rotary_dim = rotary_dim_of(config, head_dim)
        self.rope_type = rope_parameters(config).get("rope_type", "default")
        self.original_max = longrope_original_max(config)
        rows = max_position if self.original_max is None else 2 * max_position
        self.register_buffer("cos_sin_cache", torch.empty(rows, self.rotary_dim), persistent=False)
        # set at load where a CPU kernel rotates in place (backend/layers/cpu/fused.py): f(x, cos, sin, heads)
        # rotates `heads` heads of x's rows and returns True, or returns False for inputs it does not take
        self.cpu_kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], bool] | None = None

    def build(self, device: torch.device) -> None:
        cache = compute_cos_sin_cache(self.config, self.head_dim, self.max_position)
        self._buffers["cos_sin_cache"] = cache.to(device)

    def prepare(
        self, positions: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor, dtype: torch.dtype
    ) -> RopeStep:
        """Once per forward, for every layer: the cache row of each token (its position, shifted to the
        long-factor rows (longrope) when its sequence is longer than the original context this step) and,
        on CPU, the gathered cos/sin."""
        rows = positions
        if self.original_max is not None:
            long_seq = (seq_lens > self.original_max).long()  # (S,)
            per_token = torch.repeat_interleave(long_seq, query_start_loc.diff(), output_size=positions.numel())
            rows = positions + per_token * self.max_position
        return rope_step(rows, self.cos_sin_cache, dtype)

    def forward(self, rope: RopeStep, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, k, rope, self.cos_sin_cache, self.head_dim)

    def rotate_qk(self, rope: RopeStep, qk: torch.Tensor, q_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k side by side in one projection output, (T, Hq*D + Hkv*D) -> (T, Hq*D), (T, Hkv*D) views.
        The torch math rotates every head in one pass (half the small ops of rotating q and k apart)."""
        if triton_kernel("apply_rotary", qk) is not None:
            return apply_rotary(qk[:, :q_size], qk[:, q_size:], rope, self.cos_sin_cache, self.head_dim)
        t = qk.shape[0]
        if self.cpu_kernel is not None and rope.cos is not None:
            heads = qk.shape[1] // self.head_dim
            if self.cpu_kernel(qk, rope.cos, rope.sin, heads):  # in place: qk is the projection's fresh output
                return qk[:, :q_size], qk[:, q_size:]
        out = _rotate(qk.view(t, -1, self.head_dim), rope).view(t, -1)
        return out[:, :q_size], out[:, q_size:]

    def extra_repr(self) -> str:
        return f"rope_type={self.rope_type}, rotary_dim={self.rotary_dim}, max_position={self.max_position}"
