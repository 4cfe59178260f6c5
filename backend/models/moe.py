"""Mixture-of-experts families on the Llama core: Mixtral and Qwen2-MoE.

Experts are stacked parameters `experts.gate_up_proj (E, 2I, H)` and `experts.down_proj (E, H, I)` (the
layout of transformers 5). Per-expert checkpoint tensors (`experts.{e}.w1/w3/w2` or
`experts.{e}.gate_proj/up_proj/down_proj`) are copied into their slices while loading; already-stacked
checkpoints load whole. Routers are plain parameters, not `nn.Linear`, so quantization keeps them exact; on-the-fly
quantization turns each expert's two weights into quantized linears after loading (backend/quantization/experts.py).
Forward: token-expert pairs are sorted by expert once, then one matmul pair per expert that has tokens (a
loop over experts, never over tokens); each token's top-k contributions are summed in one reduction, like
transformers' default (grouped_mm) experts path.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from backend.layers.activation import act_and_mul
from backend.layers.cpu.packed import can_pack, pack_stacked, packed_linear
from backend.models.checkpoint import Region
from backend.models.llama import MLP, LlamaForCausalLM
from backend.models.options import ModelOptions, options_from_config, uniform_windows

_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class Router(nn.Module):
    """(T, H) -> (T, E) logits; a bare weight so that quantization leaves it alone."""

    def __init__(self, num_experts: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str) -> None:
        super().__init__()
        self.num_experts, self.act = num_experts, act
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # (gate_up, down) per expert once packed; the attribute name is the one the transformers experts get too
        # (layers/packed_experts.py), so describe finds both
        self.flab_packed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        # per-expert quantized linears after on-the-fly quantization (backend/quantization/experts.py); the same
        # attribute on the transformers experts modules
        self.flab_quantized: nn.Module | None = None

    def pack(self) -> bool:
        """CPUs with 16-bit matmul (EngineConfig.cpu_linear "packed"): reorder each expert's weights once for
        oneDNN (`pack_stacked`), as layers/packed.py does for linears (`F.linear` on a bf16 slice reorders it on
        every call). Products stay bit for bit `F.linear`'s."""
        if self.flab_packed is not None or not can_pack(self.gate_up_proj):  # a meta placeholder is not a CPU tensor
            return False
        self.flab_packed = (pack_stacked(self, "gate_up_proj"), pack_stacked(self, "down_proj"))
        return True

    def _product(self, x: torch.Tensor, e: int, which: int) -> torch.Tensor:  # (n, K) -> (n, N) with expert e
        if self.flab_quantized is not None:
            return self.flab_quantized.product(x, e, which)
        if self.flab_packed is not None:
            return packed_linear(x, self.flab_packed[which][e])
        return F.linear(x, (self.gate_up_proj, self.down_proj)[which][e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # x: (T, H); weights, ids: (T, K) -> (T, H)
        t, k = ids.shape
        flat = ids.reshape(-1)  # (S,) S = T*K token-expert pairs
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = x[order // k]  # (S, H), grouped by expert
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                h = act_and_mul(self._product(xs[start : start + n], e, 0), self.act)  # (n, I)
                outs.append(self._product(h, e, 1))  # (n, H)
                start += n
        weighted = torch.cat(outs) * weights.reshape(-1)[order, None]  # (S, H), in the weights' dtype
        unsorted = torch.empty_like(weighted)
        unsorted[order] = weighted
        # like transformers' grouped_mm path: sum the top-k contributions at once, round once
        return unsorted.view(t, k, -1).sum(dim=1).to(x.dtype)


class SparseMoE(nn.Module):
    def __init__(
        self,
        opts: ModelOptions,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        weights_in_fp32: bool,
        shared_intermediate_size: int = 0,
    ) -> None:
        super().__init__()
        self.top_k, self.renormalize, self.weights_in_fp32 = top_k, renormalize, weights_in_fp32
        self.gate = Router(num_experts, opts.hidden_size)
        self.experts = Experts(num_experts, opts.hidden_size, intermediate_size, opts.act)
        self.shared_expert = MLP(opts, shared_intermediate_size) if shared_intermediate_size else None
        self.shared_expert_gate = Router(1, opts.hidden_size) if shared_intermediate_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, H)
        logits = self.gate(x)  # (T, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # (T, K)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.weights_in_fp32:
            weights = weights.to(logits.dtype)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class _MoECausalLM(LlamaForCausalLM):
    def map_extra(self, name: str) -> Region | None:
        m = _EXPERT.match(name)
        if m is None:
            return None
        mlp, e, proj = m.group(1), int(m.group(2)), m.group(3)
        experts = self.get_submodule(mlp).experts
        num, (_, two_i, hidden) = experts.num_experts, experts.gate_up_proj.shape
        inter = two_i // 2
        if proj == "down_proj":
            return Region(f"{mlp}.experts.down_proj", (e,), (num, hidden, inter), num)
        rows = slice(0, inter) if proj == "gate_proj" else slice(inter, two_i)
        return Region(f"{mlp}.experts.gate_up_proj", (e, rows), (num, two_i, hidden), 2 * num)


class MixtralForCausalLM(_MoECausalLM):
    @classmethod
    def make_options(cls, config: PretrainedConfig) -> ModelOptions:
        return options_from_config(config, sliding_windows=uniform_windows(config))

    def make_mlp(self, opts: ModelOptions, layer_idx: int) -> nn.Module:
        c = self.config
        return SparseMoE(
            opts,
            c.num_local_experts,
            c.num_experts_per_tok,
            opts.intermediate_size,
            renormalize=True,
            weights_in_fp32=True,
        )

    def rename_checkpoint(self, name: str) -> str:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        parts = name.split(".")
        if len(parts) > 2 and parts[-2] in _MIXTRAL_NAMES and ".experts." in name:
            parts[-2] = _MIXTRAL_NAMES[parts[-2]]
        return ".".join(parts)


class Qwen2MoeForCausalLM(_MoECausalLM):
    @classmethod
    def make_options(cls, config: PretrainedConfig) -> ModelOptions:
        return options_from_config(config, qkv_bias=bool(getattr(config, "qkv_bias", True)))

    def make_mlp(self, opts: ModelOptions, layer_idx: int) -> nn.Module:
        c = self.config
        sparse = (
            layer_idx not in (c.mlp_only_layers or [])
            and c.num_experts > 0
            and (layer_idx + 1) % c.decoder_sparse_step == 0
        )
        if not sparse:
            return MLP(opts, c.intermediate_size)
        return SparseMoE(
            opts,
            c.num_experts,
            c.num_experts_per_tok,
            c.moe_intermediate_size,
            renormalize=bool(c.norm_topk_prob),
            weights_in_fp32=False,
            shared_intermediate_size=c.shared_expert_intermediate_size,
        )
