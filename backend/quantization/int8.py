"""int8: on-the-fly weight-only quantization, per-output-channel symmetric scales (W8A16).

Each full-precision weight is quantized the moment it arrives in `load_tensor` and dropped, so the
full-precision model is never in memory (MoE experts, and transformers checkpoints that need its weight
conversions, are quantized right after loading instead: experts.py, quantize_loaded_linears).
CPU: torch._weight_int8pack_mm (fp32/bf16/fp16); CUDA: Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from backend.core.errors import QuantizationError
from backend.quantization.base import QuantMethod
from backend.quantization.intquant import OnTheFlyIntLinear

LM_HEAD_CHOICES = ("none", "int8")


@dataclass
class Int8Config:
    kernel: str = "auto"  # auto | torch | triton
    lm_head: str = "none"  # the output projection: "none" keeps it in full precision, "int8" quantizes it too

    def __post_init__(self) -> None:
        check_lm_head(self.lm_head, LM_HEAD_CHOICES)


def check_lm_head(value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise QuantizationError(f"lm_head must be one of {list(choices)}, got {value!r}")


class Int8Linear(OnTheFlyIntLinear):
    method = "int8"

    def __init__(
        self, in_features: int, out_features: int, bias: bool, prefix: str = "", config: Int8Config | None = None
    ) -> None:
        config = config or Int8Config()
        super().__init__(in_features, out_features, bias, prefix, bits=8, group_size=in_features, kernel=config.kernel)


class Int8Method(QuantMethod):
    name = "int8"
    on_the_fly = True
    config_class = Int8Config
    config: Int8Config

    def create_linear(self, linear: nn.Linear, prefix: str) -> Int8Linear:
        return Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, prefix, self.config)

    def describe(self) -> str:
        head = ", lm_head int8" if self.config.lm_head == "int8" else ""
        return f"int8 (W8A16, per-channel symmetric, on the fly{head})"
