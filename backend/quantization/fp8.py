"""fp8: float8_e4m3fn weights with float32 scales; on-the-fly per-channel quantization and the FP8 runtime.

Runtime (shared with the FP8 checkpoint and compressed-tensors float formats), canonical form:
    weight (N, K) float8_e4m3fn, scales (N, G) float32, W[n, k] = weight[n, k] * scales[n, k // group_size]
Kernels, chosen at finalize:
    scaled_mm : CUDA with fp8 tensor cores (compute capability >= 8.9), bf16 activations, one scale per
                channel: W8A8 via torch._scaled_mm with dynamic per-token activation scales.
    triton    : other CUDA GPUs (and block scales): weight-only, fp8 decoded in the kernel.
    torch     : CPU (no fp8 matmul): weight-only, dequantized per forward (logged once per model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from backend.core.errors import QuantizationError
from backend.quantization.base import KERNELS, QuantLinearBase, QuantMethod
from backend.quantization.intquant import force_triton, num_groups
from flab_kernels.quant_torch import dequantize_weight, quant_matmul_torch

logger = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # -> (N, K) fp8, (N, 1) f32
    wf = w.float()
    scales = (wf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # (N, 1)
    return (wf / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8LinearBase(QuantLinearBase):
    """Runtime of all fp8 weight formats; subclasses produce the canonical form (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, prefix: str, kernel: str = "auto") -> None:
        super().__init__(in_features, out_features, bias, prefix)
        if kernel not in KERNELS:
            raise QuantizationError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel_pref = kernel
        self.group_size = in_features
        self.register_buffer("w_q", None)
        self.register_buffer("w_scales", None)

    def _set_fp8_weight(self, weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
        n, k = self.out_features, self.in_features
        self.group_size = group_size
        g = num_groups(k, group_size)
        if weight.dtype != torch.float8_e4m3fn:
            raise QuantizationError(f"{self._where()}: fp8 weights must be float8_e4m3fn, got {weight.dtype}")
        if tuple(weight.shape) != (n, k) or tuple(scales.shape) != (n, g):
            raise QuantizationError(
                f"{self._where()}: weight {tuple(weight.shape)} / scales {tuple(scales.shape)} "
                f"do not match ({n}, {k}) with group {group_size}"
            )
        self.w_q = weight.to(self.device).contiguous()
        self.w_scales = scales.to(device=self.device, dtype=torch.float32).contiguous()
        self.kernel = self._choose_kernel(g)

    def _choose_kernel(self, g: int) -> str:
        if self.kernel_pref == "torch":
            return "torch"
        cuda = self.device.type == "cuda"
        if (
            self.kernel_pref == "auto"
            and cuda
            and g == 1
            and self.act_dtype == torch.bfloat16
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
            and fp8_tensor_cores(self.device)
        ):
            return "scaled_mm"
        if self.kernel_pref == "triton" or cuda or force_triton():
            from flab_kernels.quant_matmul import block_k_for

            return "triton" if block_k_for(self.group_size, g) is not None else "torch"
        return "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = self._prepare_input(x)  # (M, K)
        if self.kernel == "scaled_mm":
            x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)  # (M, 1)
            xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(
                xq, self.w_q.t(), scale_a=x_scale, scale_b=self.w_scales.t(), out_dtype=self.act_dtype, bias=self.bias
            )  # (M, N)
        elif self.kernel == "triton":
            from flab_kernels.quant_matmul import quant_matmul_triton

            y = quant_matmul_triton(x2, self.w_q, self.w_scales, None, self.group_size, "fp8", self.bias)
        else:
            y = quant_matmul_torch(
                x2, self.w_q.view(torch.uint8), self.w_scales, None, self.group_size, "fp8", self.bias
            )
        return y.reshape(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:  # (N, K) float32
        return dequantize_weight(
            self.w_q.view(torch.uint8), self.w_scales, None, self.group_size, "fp8", self.in_features
        )

    def describe(self) -> str:
        g = num_groups(self.in_features, self.group_size)
        group = "channel" if g == 1 else f"group={self.group_size}"
        mode = "W8A8 dynamic per-token" if self.kernel == "scaled_mm" else "weight-only (dequantized, no fp8 matmul)"
        return f"method={self.method}, bits=8 e4m3, {group}, {mode}"


@dataclass
class Fp8Config:
    kernel: str = "auto"  # auto | torch | triton


class Fp8Linear(Fp8LinearBase):
    method = "fp8"

    def __init__(
        self, in_features: int, out_features: int, bias: bool, prefix: str = "", config: Fp8Config | None = None
    ) -> None:
        super().__init__(in_features, out_features, bias, prefix, (config or Fp8Config()).kernel)

    def checkpoint_tensor_names(self) -> set[str]:
        return {"weight", "bias"}

    def output_dim(self, name: str) -> int | None:
        self._check_name(name)
        return 0

    def _load(self, name: str, tensor: torch.Tensor) -> None:
        self._check_shape(name, tensor, (self.out_features, self.in_features))
        if not tensor.is_floating_point():
            raise QuantizationError(f"{self._where()}: weight is {tensor.dtype}, on-the-fly fp8 needs a float weight")
        weight, scales = quantize_fp8_per_channel(tensor.to(self.device))
        self._set_fp8_weight(weight, scales, self.in_features)


class Fp8Method(QuantMethod):
    name = "fp8"
    on_the_fly = True
    config_class = Fp8Config
    config: Fp8Config

    def check_device(self, device: torch.device) -> None:
        super().check_device(device)
        warn_fp8_weight_only(torch.device(device), self.name)

    def create_linear(self, linear: nn.Linear, prefix: str) -> Fp8Linear:
        return Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None, prefix, self.config)

    def describe(self) -> str:
        return "fp8 (e4m3 per-channel; W8A8 on fp8 GPUs, weight-only elsewhere; on the fly)"


def warn_fp8_weight_only(device: torch.device, name: str) -> None:
    if device.type == "cpu":
        logger.warning(
            "%s on CPU: no fp8 matmul here, weights stay fp8 and are dequantized per forward "
            "(weight-only; saves memory, not time)",
            name,
        )
    elif device.type == "cuda" and torch.cuda.is_available() and not fp8_tensor_cores(device):
        logger.warning("%s on a GPU without fp8 tensor cores (< sm89): weight-only Triton kernel", name)
