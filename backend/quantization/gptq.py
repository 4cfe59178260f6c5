"""GPTQ checkpoints: 4 and 8 bit, symmetric or asymmetric, group-wise or per-channel, act-order (desc_act).

Checkpoint tensors per linear (pack = 32 // bits, G = K / group_size, or 1 for group_size -1):
    qweight (K / pack, N) int32  codes packed along K, sequential
    qzeros  (G, N / pack) int32  zero codes packed along N; the classic format (checkpoint_format "gptq",
                                 v1) stores zero - 1 (so symmetric 4 bit stores 7), "gptq_v2" stores the zero
    scales  (G, N) float16
    g_idx   (K,) int32           group of each input column (non-trivial with desc_act)
    bias    (N,) optional
W[n, k] = (code[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n].

On CPU the codes are unpacked once at finalize into the int8/int4 CPU fast-path layouts (see
intquant.py): 8-bit symmetric per-channel is bit-exact; 4-bit folds zeros into the kernel's float offset
(-zero * scale, one rounding in the activation dtype). Otherwise they stay packed and are dequantized
per forward. Fused shards (q/k/v, gate/up) concatenate qweight/qzeros/scales along N; g_idx is identical
across shards (they share the input, hence the act-order permutation), so the first shard's is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from backend.core.errors import QuantizationError
from backend.quantization.base import QuantMethod
from backend.quantization.intquant import IntLinearBase, num_groups
from backend.quantization.packing import unpack_int32

FORMATS = ("gptq", "gptq_v2")


@dataclass
class GPTQConfig:
    bits: int = 4
    group_size: int = 128  # -1 = one group per row
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"  # gptq (v1: zeros stored minus one) | gptq_v2
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise QuantizationError(f"GPTQ with {self.bits} bits is not supported (4 and 8 are)")
        if self.checkpoint_format not in FORMATS:
            raise QuantizationError(f"GPTQ checkpoint_format {self.checkpoint_format!r} is not supported ({FORMATS})")
        if self.group_size != -1 and self.group_size <= 0:
            raise QuantizationError(f"GPTQ group_size must be positive or -1, got {self.group_size}")


class GPTQLinear(IntLinearBase):
    method = "gptq"

    def __init__(
        self, in_features: int, out_features: int, bias: bool, prefix: str = "", config: GPTQConfig | None = None
    ) -> None:
        config = config or GPTQConfig()
        group = in_features if config.group_size == -1 else config.group_size
        super().__init__(in_features, out_features, bias, prefix, config.bits, group, config.kernel)
        self.config = config
        self.pack = 32 // config.bits
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            self.register_buffer(name, None)

    def checkpoint_tensor_names(self) -> set[str]:
        return {"qweight", "qzeros", "scales", "g_idx", "bias"}

    def required_tensor_names(self) -> set[str]:
        return super().required_tensor_names() - {"g_idx"}  # some exporters omit a trivial g_idx

    def output_dim(self, name: str) -> int | None:
        """qweight/qzeros/scales: 1 (N is their last dim); bias: 0; g_idx: None (shared by fused shards)."""
        self._check_name(name)
        return {"qweight": 1, "qzeros": 1, "scales": 1, "bias": 0}.get(name)

    def merge_shards(self, name: str, shards: list[torch.Tensor], shard_out_features: list[int]) -> torch.Tensor:
        if name == "qzeros" and any(n % self.pack for n in shard_out_features):
            raise QuantizationError(
                f"{self._where()}: cannot fuse shards {shard_out_features}: qzeros pack {self.pack} columns per int32"
            )
        if name == "g_idx" and any(not torch.equal(s, shards[0]) for s in shards[1:]):
            raise QuantizationError(f"{self._where()}: fused shards have different g_idx; load them unfused")
        return super().merge_shards(name, shards, shard_out_features)

    def _load(self, name: str, tensor: torch.Tensor) -> None:
        n, k, p = self.out_features, self.in_features, self.pack
        g = num_groups(k, self.group_size)
        expected = {"qweight": (-(-k // p), n), "qzeros": (g, -(-n // p)), "scales": (g, n), "g_idx": (k,)}[name]
        self._check_shape(name, tensor, expected)
        self._buffers[name] = tensor.to(self.device)

    def _finalize(self) -> None:
        n, k, bits = self.out_features, self.in_features, self.config.bits
        half = 2 ** (bits - 1)
        codes = unpack_int32(self.qweight, bits, dim=0, length=k).t()  # (N, K)
        zero_codes = unpack_int32(self.qzeros, bits, dim=1, length=n).t()  # (N, G)
        if self.config.checkpoint_format == "gptq":
            zero_codes = zero_codes + 1  # v1 stores zero - 1 (not masked: AutoGPTQ's kernels add 1 the same way)
        q = (codes - half).to(torch.int8)
        zeros = (zero_codes - half).float()
        scales = self.scales.t()  # (N, G)
        g_idx = self.g_idx
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            self._buffers[name] = None
        if g_idx is not None and (int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[1]):
            raise QuantizationError(f"{self._where()}: g_idx values out of range [0, {scales.shape[1]})")
        self._set_int_weight(q, scales, zeros, g_idx)


class GPTQMethod(QuantMethod):
    name = "gptq"
    config_class = GPTQConfig
    config: GPTQConfig

    @classmethod
    def from_checkpoint(cls, qcfg: dict) -> "GPTQMethod":
        fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
        if fmt not in FORMATS:
            raise QuantizationError(f"GPTQ checkpoint_format {fmt!r} is not supported; supported: {FORMATS}")
        config = GPTQConfig(
            bits=int(qcfg.get("bits", 4)),
            group_size=int(qcfg.get("group_size", 128)),
            desc_act=bool(qcfg.get("desc_act", False)),
            sym=bool(qcfg.get("sym", True)),
            checkpoint_format=fmt,
        )
        ignore = [] if qcfg.get("lm_head") else ["lm_head"]
        ignore += list(qcfg.get("modules_to_not_convert") or [])
        for pattern, override in (qcfg.get("dynamic") or {}).items():
            if pattern.startswith("-:"):
                ignore.append("re:" + pattern[2:])
            elif override:
                raise QuantizationError(
                    f"GPTQ per-module overrides (dynamic {pattern!r}: {override}) are not supported"
                )
        return cls(config, ignore)

    def create_linear(self, linear: nn.Linear, prefix: str) -> GPTQLinear:
        return GPTQLinear(linear.in_features, linear.out_features, linear.bias is not None, prefix, self.config)

    def describe(self) -> str:
        c = self.config
        return (
            f"gptq ({c.bits} bit, group {c.group_size}, {'sym' if c.sym else 'asym'}"
            f"{', desc_act' if c.desc_act else ''}, {c.checkpoint_format})"
        )
