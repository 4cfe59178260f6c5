"""compressed-tensors checkpoints (llm-compressor): pack-quantized / int-quantized integers and float-quantized FP8.

Per config group (`config_groups`, first by exact name, then regex, then class "Linear"; `ignore` skips):
  pack-quantized (W4A16 / W8A16, strategy channel | group | tensor, symmetric or not):
    weight_packed     (N, ceil(K * bits / 32)) int32  codes (signed value + 2**(bits-1)) packed along K
    weight_scale      (N, G) / (N, 1) / one value
    weight_zero_point (ceil(N * bits / 32), G) int32  asymmetric only, zero codes packed along N
    weight_shape      (2,) int64 = (N, K);  weight_g_idx (K,) optional (older actorder=group exports)
  int-quantized / naive-quantized 8 bit: weight (N, K) int8 signed, weight_scale, weight_zero_point (N, G) int8.
    Activation quantization of int W8A8 schemes is not done: weights run W8A16 (logged).
  float-quantized FP8 (e4m3, strategy tensor | channel | block): weight (N, K) fp8, weight_scale, input_scale
    (unused: activations are scaled per token) -> the FP8 runtime of fp8.py.
W = (signed value - signed zero point) * scale. Integer weights are unpacked once at finalize into the
CPU fast-path layouts (see intquant.py), or kept packed (nibbles) for Triton / the torch path.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from backend.core.errors import QuantizationError
from backend.quantization.base import KERNELS, QuantMethod, module_matches
from backend.quantization.fp8 import warn_fp8_weight_only
from backend.quantization.fp8_checkpoint import Fp8CheckpointConfig, Fp8CheckpointLinear
from backend.quantization.intquant import IntLinearBase, num_groups
from backend.quantization.packing import unpack_int32

logger = logging.getLogger(__name__)

INT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")
FLOAT_FORMATS = ("float-quantized", "naive-quantized")


@dataclass
class CTScheme:
    targets: list[str]
    format: str
    type: str  # int | float
    bits: int
    strategy: str  # tensor | channel | group | block
    symmetric: bool = True
    group_size: int | None = None
    block_structure: tuple[int, int] | None = None
    kernel: str = "auto"

    @property
    def packed(self) -> bool:
        return self.format == "pack-quantized"


def parse_scheme(name: str, group: dict, default_format: str | None) -> CTScheme:
    fmt = group.get("format") or default_format
    weights = group.get("weights")
    if not weights:
        raise QuantizationError(f"compressed-tensors group {name!r} quantizes no weights; not supported")
    qtype, bits = weights.get("type", "int"), int(weights.get("num_bits", 8))
    strategy = weights.get("strategy") or ("group" if weights.get("group_size") else "tensor")
    scheme = CTScheme(
        list(group.get("targets") or []),
        fmt,
        qtype,
        bits,
        strategy,
        bool(weights.get("symmetric", True)),
        weights.get("group_size"),
        tuple(weights["block_structure"]) if weights.get("block_structure") else None,
    )
    if qtype == "int":
        if fmt not in INT_FORMATS or bits not in ((4, 8) if scheme.packed else (8,)):
            raise QuantizationError(
                f"compressed-tensors format {fmt!r} with {bits}-bit int weights is not supported "
                "(pack-quantized 4/8 bit and int-quantized 8 bit are)"
            )
        if strategy not in ("tensor", "channel", "group") or (strategy == "group" and not scheme.group_size):
            raise QuantizationError(f"compressed-tensors int weight strategy {strategy!r} is not supported")
        acts = group.get("input_activations")
        if acts:
            logger.warning(
                "compressed-tensors group %r quantizes activations (%s); running weight-only (W%dA16)",
                name,
                acts.get("type"),
                bits,
            )
    elif qtype == "float":
        if fmt not in FLOAT_FORMATS or bits != 8:
            raise QuantizationError(
                f"compressed-tensors format {fmt!r} with {bits}-bit float weights is not "
                "supported (float-quantized FP8 is)"
            )
        if strategy not in ("tensor", "channel", "block"):
            raise QuantizationError(f"compressed-tensors fp8 weight strategy {strategy!r} is not supported")
    else:
        raise QuantizationError(f"compressed-tensors weight type {qtype!r} is not supported")
    return scheme


class CTIntLinear(IntLinearBase):
    method = "compressed-tensors"

    def __init__(self, in_features: int, out_features: int, bias: bool, prefix: str, scheme: CTScheme) -> None:
        group = scheme.group_size if scheme.strategy == "group" else in_features
        super().__init__(in_features, out_features, bias, prefix, scheme.bits, group, scheme.kernel)
        self.scheme = scheme
        for name in self.checkpoint_tensor_names() - {"bias"}:
            self.register_buffer(name, None)

    def checkpoint_tensor_names(self) -> set[str]:
        weight = "weight_packed" if self.scheme.packed else "weight"
        return {weight, "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "bias"}

    def required_tensor_names(self) -> set[str]:
        names = {"weight_packed" if self.scheme.packed else "weight", "weight_scale"}
        names |= {"bias"} if self.has_bias else set()
        return names if self.scheme.symmetric else names | {"weight_zero_point"}

    def output_dim(self, name: str) -> int | None:
        """N is dim 0 of weight(_packed), weight_scale, packed or not weight_zero_point, bias; weight_shape and
        weight_g_idx have none (merge_shards sums weight_shape's N, keeps the first g_idx)."""
        self._check_name(name)
        return None if name in ("weight_shape", "weight_g_idx") else 0

    def merge_shards(self, name: str, shards: list[torch.Tensor], shard_out_features: list[int]) -> torch.Tensor:
        self._check_name(name)
        if name == "weight_shape":
            return torch.tensor([sum(int(s[0]) for s in shards), int(shards[0][1])], dtype=shards[0].dtype)
        if name == "weight_scale" and all(s.numel() == 1 for s in shards):
            return torch.cat([s.reshape(1, 1).expand(n, 1) for s, n in zip(shards, shard_out_features)])
        per_word = 32 // self.bits
        if name == "weight_zero_point" and self.scheme.packed and any(n % per_word for n in shard_out_features):
            raise QuantizationError(
                f"{self._where()}: cannot fuse shards {shard_out_features}: zero points pack "
                f"{32 // self.bits} rows per int32"
            )
        return super().merge_shards(name, shards, shard_out_features)

    def _load(self, name: str, tensor: torch.Tensor) -> None:
        n, k, bits = self.out_features, self.in_features, self.bits
        if name == "weight_packed":
            self._check_shape(name, tensor, (n, -(-k * bits // 32)))
        elif name == "weight":
            self._check_shape(name, tensor, (n, k))
        elif name == "weight_shape" and [int(v) for v in tensor.tolist()] != [n, k]:
            raise QuantizationError(f"{self._where()}: weight_shape {tensor.tolist()} != ({n}, {k})")
        self._buffers[name] = tensor.to(self.device)

    def _canonical_scales(self, scale: torch.Tensor) -> torch.Tensor:  # -> (N, G)
        n, g = self.out_features, num_groups(self.in_features, self.group_size)
        if scale.numel() == 1:
            return scale.reshape(1, 1).expand(n, g)
        if scale.numel() == n * g:
            return scale.reshape(n, g)
        raise QuantizationError(
            f"{self._where()}: weight_scale of shape {tuple(scale.shape)} does not fit "
            f"({n}, {g}) for strategy {self.scheme.strategy}"
        )

    def _finalize(self) -> None:
        n, k, half = self.out_features, self.in_features, 2 ** (self.bits - 1)
        if self.scheme.packed:
            q = (unpack_int32(self.weight_packed, self.bits, dim=1, length=k) - half).to(torch.int8)  # (N, K)
        else:
            q = self.weight.to(torch.int8)
        scales = self._canonical_scales(self.weight_scale)
        zeros = None
        zp = self.weight_zero_point
        if zp is not None and not self.scheme.symmetric:
            g = scales.shape[1]
            if self.scheme.packed:
                zeros = (unpack_int32(zp, self.bits, dim=0, length=n) - half).float()  # (N, G)
            else:
                zeros = zp.float()
            zeros = zeros.reshape(-1, 1).expand(n, g) if zeros.numel() in (1, n) and g > 1 else zeros.reshape(n, g)
        g_idx = self.weight_g_idx
        for name in self.checkpoint_tensor_names() - {"bias"}:
            self._buffers[name] = None
        self._set_int_weight(q, scales, zeros, g_idx)


class CTFp8Linear(Fp8CheckpointLinear):
    method = "compressed-tensors"

    def __init__(self, in_features: int, out_features: int, bias: bool, prefix: str, scheme: CTScheme) -> None:
        block = scheme.block_structure if scheme.strategy == "block" else None
        super().__init__(in_features, out_features, bias, prefix, Fp8CheckpointConfig(block, kernel=scheme.kernel))

    def checkpoint_tensor_names(self) -> set[str]:
        return {"weight", "weight_scale", "input_scale", "bias"}


class CompressedTensorsMethod(QuantMethod):
    name = "compressed-tensors"

    def __init__(self, schemes: list[CTScheme], ignore: list[str]) -> None:
        super().__init__(ignore=ignore)
        self.schemes = schemes

    @classmethod
    def from_checkpoint(cls, qcfg: dict) -> "CompressedTensorsMethod":
        status = qcfg.get("quantization_status") or "compressed"
        status = str(getattr(status, "value", status))  # an enum when the config comes from the package
        if status != "compressed":
            raise QuantizationError(
                f"compressed-tensors checkpoint with quantization_status={status!r} holds float "
                "weights, not compressed ones; save it compressed (llm-compressor's default)"
            )
        sparsity = qcfg.get("sparsity_config") or {}
        if sparsity and sparsity.get("format", "dense") != "dense":
            raise QuantizationError(f"compressed-tensors sparsity format {sparsity.get('format')!r} is not supported")
        if qcfg.get("kv_cache_scheme"):
            logger.warning("compressed-tensors kv_cache_scheme is ignored: the KV cache stays in the model dtype")
        groups = qcfg.get("config_groups") or {}
        if not groups:
            raise QuantizationError("compressed-tensors checkpoint has no config_groups")
        schemes = [parse_scheme(name, group, qcfg.get("format")) for name, group in groups.items()]
        return cls(schemes, list(qcfg.get("ignore") or []))

    def set_kernel(self, kernel: str) -> None:
        if kernel not in KERNELS:
            raise QuantizationError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        for scheme in self.schemes:
            scheme.kernel = kernel

    def scheme_for(self, prefix: str) -> CTScheme | None:
        parts = prefix.split(".")
        suffixes = {".".join(parts[i:]) for i in range(len(parts))}
        for kind in ("name", "regex", "class"):
            for scheme in self.schemes:
                for t in scheme.targets:
                    if kind == "name" and not t.startswith("re:") and t in suffixes:
                        return scheme
                    if kind == "regex" and t.startswith("re:") and any(re.match(t[3:], s) for s in suffixes):
                        return scheme
                    if kind == "class" and t == "Linear":
                        return scheme
        return None

    def skip(self, prefix: str) -> bool:
        return any(module_matches(prefix, p) for p in self.ignore) or self.scheme_for(prefix) is None

    def check_device(self, device: torch.device) -> None:
        super().check_device(device)
        if any(s.type == "float" for s in self.schemes):
            warn_fp8_weight_only(torch.device(device), self.name)

    def create_linear(self, linear: nn.Linear, prefix: str) -> CTIntLinear | CTFp8Linear:
        scheme = self.scheme_for(prefix)
        if scheme is None:
            raise QuantizationError(f"{prefix}: no compressed-tensors config group targets this module")
        cls = CTIntLinear if scheme.type == "int" else CTFp8Linear
        return cls(linear.in_features, linear.out_features, linear.bias is not None, prefix, scheme)

    def describe(self) -> str:
        parts = [
            f"{s.format} {s.type}{s.bits} {s.strategy}{'' if s.group_size is None else s.group_size}"
            for s in self.schemes
        ]
        return f"compressed-tensors ({'; '.join(parts)})"
