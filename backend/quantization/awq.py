"""AWQ checkpoints, GEMM packing (`version: gemm`), 4 bit with zero points.

Checkpoint tensors per linear (G = K / group_size):
    qweight (K, N / 8) int32  codes packed along N in AWQ's interleaved order: bits [4i, 4i+4) of a word
                              hold column order[i] of its 8 columns, order = [0, 2, 4, 6, 1, 3, 5, 7]
    qzeros  (G, N / 8) int32  zero codes, same packing (stored as is, no minus one)
    scales  (G, N) float16
    bias    (N,) optional
W[n, k] = (code[k, n] - zero[k // group_size, n]) * scales[k // group_size, n].
Unpacked once at finalize into the int4 CPU fast-path layout (zeros folded into the kernel's float
offset) or the nibble layout of the Triton / torch paths. Fused shards concatenate along N (each shard's
out_features a multiple of 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from backend.core.errors import QuantizationError
from backend.quantization.base import QuantMethod
from backend.quantization.intquant import IntLinearBase, num_groups
from backend.quantization.packing import AWQ_ORDER, unpack_int32


@dataclass
class AWQConfig:
    bits: int = 4
    group_size: int = 128
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise QuantizationError(f"AWQ with {self.bits} bits is not supported (4 is)")
        if self.group_size <= 0:
            raise QuantizationError(f"AWQ group_size must be positive, got {self.group_size}")


class AWQLinear(IntLinearBase):
    method = "awq"

    def __init__(
        self, in_features: int, out_features: int, bias: bool, prefix: str = "", config: AWQConfig | None = None
    ) -> None:
        config = config or AWQConfig()
        super().__init__(in_features, out_features, bias, prefix, config.bits, config.group_size, config.kernel)
        self.config = config
        for name in ("qweight", "qzeros", "scales"):
            self.register_buffer(name, None)

    def checkpoint_tensor_names(self) -> set[str]:
        return {"qweight", "qzeros", "scales", "bias"}

    def output_dim(self, name: str) -> int | None:
        """qweight/qzeros/scales: 1 (N is their last dim); bias: 0."""
        self._check_name(name)
        return 0 if name == "bias" else 1

    def merge_shards(self, name: str, shards: list[torch.Tensor], shard_out_features: list[int]) -> torch.Tensor:
        if name in ("qweight", "qzeros") and any(n % 8 for n in shard_out_features):
            raise QuantizationError(
                f"{self._where()}: cannot fuse shards {shard_out_features}: AWQ packs 8 columns per int32"
            )
        return super().merge_shards(name, shards, shard_out_features)

    def _load(self, name: str, tensor: torch.Tensor) -> None:
        n, k = self.out_features, self.in_features
        g = num_groups(k, self.group_size)
        expected = {"qweight": (k, -(-n // 8)), "qzeros": (g, -(-n // 8)), "scales": (g, n)}[name]
        self._check_shape(name, tensor, expected)
        self._buffers[name] = tensor.to(self.device)

    def _finalize(self) -> None:
        n = self.out_features
        codes = unpack_int32(self.qweight, 4, dim=1, length=n, order=AWQ_ORDER).t()  # (N, K)
        zero_codes = unpack_int32(self.qzeros, 4, dim=1, length=n, order=AWQ_ORDER).t()  # (N, G)
        scales = self.scales.t()  # (N, G)
        for name in ("qweight", "qzeros", "scales"):
            self._buffers[name] = None
        self._set_int_weight((codes - 8).to(torch.int8), scales, (zero_codes - 8).float())


class AWQMethod(QuantMethod):
    name = "awq"
    config_class = AWQConfig
    config: AWQConfig

    @classmethod
    def from_checkpoint(cls, qcfg: dict) -> "AWQMethod":
        version = str(qcfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantizationError(f"AWQ version {version!r} is not supported; only the GEMM packing ('gemm') is")
        if not qcfg.get("zero_point", True):
            raise QuantizationError("AWQ without zero points (zero_point: false) is not supported")
        bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
        group = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
        ignore = ["lm_head", *(qcfg.get("modules_to_not_convert") or [])]
        return cls(AWQConfig(bits=bits, group_size=group), ignore)

    def create_linear(self, linear: nn.Linear, prefix: str) -> AWQLinear:
        return AWQLinear(linear.in_features, linear.out_features, linear.bias is not None, prefix, self.config)

    def describe(self) -> str:
        return f"awq (4 bit, group {self.config.group_size}, gemm)"
