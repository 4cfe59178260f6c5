"""bf16/fp16 weights, fp32 matmuls for many-token steps on CPUs without native 16-bit matmul.

On x86 CPUs without AVX512-BF16/AMX, torch's bf16 matmul runs at about a quarter of fp32's speed
(measured on the CI machine: 25 vs 94 GFLOP/s for a 2048x576x1536 product). Converting the weight to
fp32 on the fly costs one pass over it, which a prefill chunk of many tokens amortizes; single-token
decode keeps the 16-bit path (it is memory-bound and the smaller weights read faster). Results are
the same math at higher precision than the 16-bit path.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 16  # below this many tokens the 16-bit matmul is as fast and reads half the bytes


def cpu_has_fast_half_matmul() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown platform: leave the model alone
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "avx512_fp16"))


class UpcastLinear(nn.Linear):
    """An nn.Linear whose many-row products run in fp32 (weights stay 16-bit in memory)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] < MIN_ROWS:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def upcast_linears(model: nn.Module) -> int:
    """Switch every plain 16-bit nn.Linear of `model` to UpcastLinear in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype in (torch.bfloat16, torch.float16):
            module.__class__ = UpcastLinear
            count += 1
    return count
