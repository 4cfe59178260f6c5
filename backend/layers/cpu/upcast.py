"""bf16/fp16 weights on CPUs without native 16-bit matmul: fp32 products from a pre-transposed fp32 copy.

On x86 CPUs without AVX512-BF16/AMX, torch's 16-bit matmul runs at a fraction of fp32's speed, and
even fp32 `F.linear` (weight `(N, K)`) is slow for a few rows. Measured on the CI machine (Xeon,
AVX512 without BF16, 2 cores) over the 30 layers of a SmolLM2-135M-shaped model:

    rows           1      2      4      8     16     32    256
    bf16 (N, K)  17.6   30.2   47.1   64.6  103.3  172.5   ~900 ms
    fp32 (K, N)  21.1   37.1   37.7   42.2   52.4   69.0    277 ms

So a layer keeps its 16-bit weight for one or two rows (single-sequence decode: memory-bound, the
smaller weight reads faster) and multiplies anything larger by an fp32 `(K, N)` copy made once at
load time. The copy takes 4 bytes per weight (with the 16-bit weight, 3x its bytes in all); it is
counted in the engine's weight bytes, skipped when memory is short, and `cpu_linear="none"` turns it
off. Results are the same products at higher precision than the 16-bit path.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MAX_HALF_ROWS = 2  # up to this many rows the 16-bit weight is used as is


MATMUL_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")  # x86 flags that decide the CPU linear path
FAST_HALF_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_fp16")


@functools.cache
def cpu_matmul_flags() -> tuple[str, ...] | None:
    """Which of MATMUL_FLAGS this CPU has (None where /proc/cpuinfo cannot be read)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return tuple(f for f in MATMUL_FLAGS if f in flags)


def cpu_has_fast_half_matmul() -> bool:
    """True when the CPU has native bf16/fp16 matmul instructions (or the platform is unknown)."""
    flags = cpu_matmul_flags()
    return flags is None or any(f in flags for f in FAST_HALF_FLAGS)


class UpcastLinear(nn.Linear):
    """An nn.Linear with a non-persistent fp32 `(K, N)` copy of its weight for many-row products."""

    weight_t: torch.Tensor  # (K, N) fp32
    bias_f32: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        if x.numel() <= MAX_HALF_ROWS * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.shape[-1]).float()  # (M, K)
        if self.bias_f32 is None:
            out = torch.mm(x2, self.weight_t)
        else:
            out = torch.addmm(self.bias_f32, x2, self.weight_t)  # (M, N)
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


def half_linears(model: nn.Module) -> list[nn.Linear]:
    """The plain 16-bit nn.Linear modules of `model`, which the CPU linear paths (upcast, packed) replace; quantized
    and fp32 linears are left alone."""
    return [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype in (torch.bfloat16, torch.float16)]


def upcast_linears(modules: list[nn.Linear]) -> int:
    """Give each of `modules` (from `half_linears`) its fp32 (K, N) copy, in place; returns how many."""
    for module in modules:
        weight_t = module.weight.detach().t().float().contiguous()
        bias = None if module.bias is None else module.bias.detach().float()
        module.__class__ = UpcastLinear
        module.register_buffer("weight_t", weight_t, persistent=False)
        module.register_buffer("bias_f32", bias, persistent=False)
    return len(modules)
