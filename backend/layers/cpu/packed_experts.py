"""A transformers model's MoE experts on CPU, with each expert's 16-bit weights packed once for oneDNN.

transformers 5 routes every decorated experts module (`@use_experts_implementation`: Mixtral, Qwen2-MoE,
...) through `ExpertsInterface`, chosen by `config._experts_implementation`, the way our attention goes
through `AttentionInterface`. Its CPU default, `grouped_mm`, multiplies by the stacked bf16 weights, which
oneDNN reorders on every call. `pack_hf_experts` reorders each expert's weights once (buffers; the stacked
parameters become meta placeholders, so memory holds one copy) and selects `fallback_lab_packed`, which
runs grouped_mm's steps in the same order with one packed product per expert that has tokens. Products
are bit for bit those of grouped_mm (both are oneDNN GEMMs with fp32 accumulation, checked in the tests).

Mixtral-shaped 12-layer model, transformers implementation, interleaved: 17.4 ms per batch-1 step against
22.0 with grouped_mm, 31.6 against 41.0 at batch 8. transformers releases without `ExpertsInterface`
(before its MoE refactor) keep their own experts code: nothing is packed there. The same function runs experts
quantized on the fly (backend/quantization/experts.py), one quantized product per expert with tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

try:
    from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward
except ImportError:  # pragma: no cover - transformers without the experts interface
    ExpertsInterface = grouped_mm_experts_forward = None

from backend.layers.cpu.packed import can_pack, pack_stacked, packed_linear

EXPERTS_NAME = "fallback_lab_packed"


def _products(x: torch.Tensor, product: Callable[[torch.Tensor, int], torch.Tensor], counts: list[int]) -> torch.Tensor:
    """(S, K) rows grouped by expert -> (S, N): one product(rows, e) per expert e that has rows."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(product(x[start : start + n], e))
            start += n
    return torch.cat(outs)


def packed_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:  # (T, H), (T, K), (T, K) -> (T, H)
    """Packed 16-bit experts, or quantized ones (backend/quantization/experts.py: `flab_quantized`, the method's
    quantized linear per expert); neither: transformers' own grouped_mm path (fp32, or a layout we do not pack)."""
    packed, quantized = getattr(self, "flab_packed", None), getattr(self, "flab_quantized", None)
    if quantized is not None:
        dtype = hidden_states.dtype  # each quantized linear casts to its activation dtype (the model's)
        up, down = (lambda rows, e, w=w: quantized.product(rows, e, w) for w in (0, 1))
    elif packed is not None:
        dtype = packed[0][0].dtype
        up, down = (lambda rows, e, p=p: packed_linear(rows, p[e]) for p in packed)
    else:
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, num_top_k = top_k_index.shape
    sample_weights = top_k_weights.reshape(-1)  # (S,)
    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // num_top_k].to(dtype)  # (S, H), grouped by expert
    counts = torch.bincount(expert_ids_g, minlength=self.num_experts).tolist()
    proj = _products(x, up, counts)  # (S, 2I) or (S, I)
    if self.has_bias:
        proj.add_((self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[expert_ids_g])
    proj = self._apply_gate(proj) if self.has_gate else self.act_fn(proj)  # (S, I)
    proj = _products(proj, down, counts)  # (S, H)
    if self.has_bias:
        proj.add_(self.down_proj_bias[expert_ids_g])
    if self.has_post_expert_norm:
        proj = self.post_expert_norm(proj)
    weighted = proj * sample_weights[perm].unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    return weighted[inv_perm].view(num_tokens, num_top_k, -1).sum(dim=1).to(hidden_states.dtype)


def register_experts() -> str:
    """Register `fallback_lab_packed` with transformers' ExpertsInterface (idempotent); returns the name."""
    ExpertsInterface.register(EXPERTS_NAME, packed_experts_forward)
    return EXPERTS_NAME


def pack_hf_experts(model: nn.Module) -> int:
    """Pack every transformers experts module with 16-bit CPU weights (in, out layouts both handled) and select
    our experts function for it; returns how many modules were packed."""
    if ExpertsInterface is None:
        return 0
    count = 0
    for module in model.modules():
        up_name = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
        up, down = getattr(module, up_name, None), getattr(module, "down_proj", None)
        if (
            not hasattr(module, "is_transposed")
            or not isinstance(up, nn.Parameter)
            or not isinstance(down, nn.Parameter)
            or getattr(module, "_is_expert_parallel", False)
            or not can_pack(up)
        ):
            continue
        register_experts()
        module.flab_packed = tuple(pack_stacked(module, name, module.is_transposed) for name in (up_name, "down_proj"))
        module.config._experts_implementation = EXPERTS_NAME
        count += 1
    return count
