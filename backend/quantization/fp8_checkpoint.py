"""FP8 checkpoints (`quant_method: fp8`): per-tensor, per-channel or block-wise (`weight_block_size`) scales.

Checkpoint tensors per linear: weight (N, K) float8_e4m3fn and its dequantization multiplier, named
`weight_scale_inv` (block-wise, DeepSeek/HF fine-grained: (ceil(N/bn), ceil(K/bk))) or `weight_scale`
(one value, or (N,)/(N, 1) per channel); optional `input_scale` (static activation scale) is not used:
activations are scaled per token, dynamically, where the matmul is fp8 (see fp8.py).
Block scales are expanded along N once at finalize to (N, ceil(K/bk)) float32 (+3% of the fp8 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from backend.core.errors import QuantizationError
from backend.quantization.base import QuantMethod
from backend.quantization.fp8 import Fp8LinearBase, warn_fp8_weight_only

SCALE_NAMES = ("weight_scale_inv", "weight_scale")


@dataclass
class Fp8CheckpointConfig:
    weight_block_size: tuple[int, int] | None = None  # (bn, bk); None = per-tensor or per-channel scales
    activation_scheme: str = "dynamic"
    kernel: str = "auto"


class Fp8CheckpointLinear(Fp8LinearBase):
    method = "fp8_checkpoint"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        prefix: str = "",
        config: Fp8CheckpointConfig | None = None,
    ) -> None:
        config = config or Fp8CheckpointConfig()
        super().__init__(in_features, out_features, bias, prefix, config.kernel)
        self.config = config
        for name in ("weight", *SCALE_NAMES, "input_scale"):
            self.register_buffer(name, None)

    def checkpoint_tensor_names(self) -> set[str]:
        return {"weight", *SCALE_NAMES, "input_scale", "bias"}

    def required_tensor_names(self) -> set[str]:
        return {"weight", "bias"} if self.has_bias else {"weight"}

    def output_dim(self, name: str) -> int | None:
        """weight, scales and bias: 0. input_scale: None (fused shards keep the largest; unused anyway)."""
        self._check_name(name)
        return None if name == "input_scale" else 0

    def merge_shards(self, name: str, shards: list[torch.Tensor], shard_out_features: list[int]) -> torch.Tensor:
        """Per-tensor scales of fused shards become a per-channel (N, 1) scale; block scales need every shard's
        out_features to be a multiple of the block height."""
        self._check_name(name)
        if name == "input_scale":
            return torch.stack([s.reshape(()).float() for s in shards]).amax()
        if name in SCALE_NAMES:
            if all(s.numel() == 1 for s in shards):
                return torch.cat([s.reshape(1, 1).float().expand(n, 1) for s, n in zip(shards, shard_out_features)])
            if all(s.numel() == n for s, n in zip(shards, shard_out_features)):
                return torch.cat([s.reshape(n, 1) for s, n in zip(shards, shard_out_features)])
            block = self.config.weight_block_size
            if block is None or any(n % block[0] for n in shard_out_features):
                raise QuantizationError(
                    f"{self._where()}: cannot fuse block-scaled shards of sizes {shard_out_features} "
                    f"(block {block}): each must be a multiple of the block height"
                )
        return super().merge_shards(name, shards, shard_out_features)

    def _load(self, name: str, tensor: torch.Tensor) -> None:
        if name == "weight":
            self._check_shape(name, tensor, (self.out_features, self.in_features))
            if tensor.dtype != torch.float8_e4m3fn:
                raise QuantizationError(
                    f"{self._where()}: fp8 weight has dtype {tensor.dtype}; only float8_e4m3fn "
                    "checkpoints are supported"
                )
            self.weight = tensor.to(self.device)
        else:
            self._buffers[name] = tensor.to(device=self.device, dtype=torch.float32)

    def canonical_scales(self, scale: torch.Tensor) -> tuple[torch.Tensor, int]:  # -> (N, G) f32, group size
        n, k = self.out_features, self.in_features
        if scale.numel() == 1:
            return scale.reshape(1, 1).expand(n, 1), k
        if scale.numel() == n:
            return scale.reshape(n, 1), k
        block = self.config.weight_block_size
        if block is not None:
            bn, bk = block
            expected = (-(-n // bn), -(-k // bk))
            if tuple(scale.shape) == expected:
                return scale.repeat_interleave(bn, dim=0)[:n], bk  # (N, ceil(K/bk))
        raise QuantizationError(
            f"{self._where()}: fp8 scale of shape {tuple(scale.shape)} is neither per-tensor, per-channel ({n}) nor "
            f"block-wise for weight_block_size={block} on a ({n}, {k}) weight"
        )

    def _finalize(self) -> None:
        scale = next((self._buffers[s] for s in SCALE_NAMES if self._buffers.get(s) is not None), None)
        if scale is None:
            raise QuantizationError(f"{self._where()}: no weight_scale_inv / weight_scale in the checkpoint")
        scales, group_size = self.canonical_scales(scale)
        weight = self.weight
        for name in ("weight", *SCALE_NAMES, "input_scale"):
            self._buffers[name] = None
        self._set_fp8_weight(weight, scales, group_size)


class Fp8CheckpointMethod(QuantMethod):
    name = "fp8_checkpoint"
    config_class = Fp8CheckpointConfig
    config: Fp8CheckpointConfig

    @classmethod
    def from_checkpoint(cls, qcfg: dict) -> "Fp8CheckpointMethod":
        block = qcfg.get("weight_block_size")
        if block is not None and (len(block) != 2 or any(int(b) <= 0 for b in block)):
            raise QuantizationError(f"fp8 checkpoint: weight_block_size must be two positive ints, got {block}")
        fmt = qcfg.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise QuantizationError(f"fp8 checkpoint format {fmt!r} is not supported (only e4m3)")
        ignore = ["lm_head", *(qcfg.get("modules_to_not_convert") or []), *(qcfg.get("ignored_layers") or [])]
        config = Fp8CheckpointConfig(
            tuple(int(b) for b in block) if block else None, qcfg.get("activation_scheme", "dynamic")
        )
        return cls(config, ignore)

    def check_device(self, device: torch.device) -> None:
        super().check_device(device)
        warn_fp8_weight_only(torch.device(device), "fp8 checkpoint")

    def create_linear(self, linear: nn.Linear, prefix: str) -> Fp8CheckpointLinear:
        return Fp8CheckpointLinear(
            linear.in_features, linear.out_features, linear.bias is not None, prefix, self.config
        )

    def describe(self) -> str:
        block = self.config.weight_block_size
        return f"fp8 checkpoint ({'block ' + 'x'.join(map(str, block)) if block else 'per-tensor/channel'} scales)"
