"""int4: on-the-fly weight-only group-wise quantization with scales and integer zero points (W4A16).

Group size rule: the requested group (default 128; 32, 64, 128 or 256) if it divides in_features, else
the largest of 256/128/64/32 not above it that does; if none divides in_features, one group per row.
Each weight is quantized on arrival (asymmetric min/max over [min(w,0), max(w,0)], codes 0..15) and
dropped. CPU: torch._weight_int4pack_mm_for_cpu when out_features % 16 == 0, else the torch reference;
CUDA: Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from backend.core.errors import QuantizationError
from backend.quantization.base import QuantMethod, module_matches
from backend.quantization.int8 import Int8Config, Int8Linear, check_lm_head
from backend.quantization.intquant import OnTheFlyIntLinear
from flab_kernels.quant_torch import INT4_PACK_GROUP_SIZES

GROUP_SIZES = INT4_PACK_GROUP_SIZES  # the one list: the group sizes torch's CPU int4 kernel packs


LM_HEAD_CHOICES = ("none", "int8", "int4")


@dataclass
class Int4Config:
    group_size: int = 128
    kernel: str = "auto"  # auto | torch | triton
    # the output projection: "none" keeps it in full precision; "int8" (per row, as llama.cpp's Q4 files keep their
    # output in Q8_0) or "int4" quantize it too
    lm_head: str = "none"

    def __post_init__(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise QuantizationError(f"int4 group size must be one of {GROUP_SIZES}, got {self.group_size}")
        check_lm_head(self.lm_head, LM_HEAD_CHOICES)


def effective_group_size(in_features: int, requested: int) -> int:
    for g in sorted(GROUP_SIZES, reverse=True):
        if g <= requested and in_features % g == 0:
            return g
    return in_features


class Int4Linear(OnTheFlyIntLinear):
    method = "int4"
    quantize_symmetric = False

    def __init__(
        self, in_features: int, out_features: int, bias: bool, prefix: str = "", config: Int4Config | None = None
    ) -> None:
        config = config or Int4Config()
        super().__init__(
            in_features,
            out_features,
            bias,
            prefix,
            bits=4,
            group_size=effective_group_size(in_features, config.group_size),
            kernel=config.kernel,
        )


class Int4Method(QuantMethod):
    name = "int4"
    on_the_fly = True
    config_class = Int4Config
    config: Int4Config

    def create_linear(self, linear: nn.Linear, prefix: str) -> Int4Linear | Int8Linear:
        shape = (linear.in_features, linear.out_features, linear.bias is not None, prefix)
        if self.config.lm_head == "int8" and module_matches(prefix, "lm_head"):
            return Int8Linear(*shape, Int8Config(kernel=self.config.kernel))
        return Int4Linear(*shape, self.config)

    def describe(self) -> str:
        head = f", lm_head {self.config.lm_head}" if self.config.lm_head != "none" else ""
        return f"int4 (W4A16, group {self.config.group_size}, asymmetric, on the fly{head})"
