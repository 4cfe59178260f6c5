"""A whole decode step of a Llama-style decoder in one C++ call (flab_kernels/cpu/csrc/decode_stack.h).

The per-module path (fused.py) already runs our kernels, but between them ~10 Python module calls per layer cost
more than the norms, the rotary and the attention themselves at batch 1 (measured on SmolLM2-135M: 30 layers,
the linears alone 6.6 ms of a 9.5 ms step). The stack calls the same kernels in the same order from one C++ loop,
so its results are the same bits as the per-module path: our product up to each linear's `max_rows`, above it oneDNN's
prepacked GEMM (called from C++) or the module the linear wraps (called back in Python). A step it does not take
(prefill and mixed steps, another attention backend, an activation dtype the weights do not have, a hooked
module) runs the per-module path. The GIL is released for the call: the server's event loop runs meanwhile.

A model offers its layers as `DecodeLayerParts` (backend/models/llama.py `DecoderModel.use_cpu_decode_stack`);
`build_decode_stack` takes them when every layer is the plain shape (fused RMSNorms, our GEMV on every linear,
SiLU MLP, our paged attention without sinks), else returns None with nothing changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from backend.core.forward_batch import ForwardBatch
from backend.layers.activation import KernelActivation
from backend.layers.cpu.fused import (
    FUSED_DTYPES,
    FusedInt4Product,
    FusedInt8Product,
    FusedLinear,
    FusedPagedAttention,
    FusedProduct,
    FusedRMSNorm,
)
from backend.layers.cpu.packed import PackedLinear
from backend.layers.norm import RMSNorm
from backend.layers.rotary import RopeStep


@dataclass(frozen=True)
class DecodeLayerParts:
    """One decoder layer as the stack runs it: norm, attention (qkv, per-head q / k norms, rotary, paged), o,
    norm + residual, gate_up, the activation, down."""

    input_norm: nn.Module
    post_attention_norm: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    qkv: nn.Module
    o: nn.Module
    gate_up: nn.Module
    down: nn.Module
    act: object  # the MLP's activation: KernelActivation("silu", ...) once fused.py ran
    attn: nn.Module


def _gemv(ext: ModuleType, module: nn.Module):  # -> ext.GemvWeight | None
    """Our kernel up to the product's `max_rows` rows (int4: every row count); above, oneDNN's prepacked GEMM from
    C++ (a `PackedLinear` inside) or the module itself (called back in Python), as the per-module path runs them."""
    if not isinstance(module, FusedLinear):
        return None
    p, inner = module.product, module.inner
    large = (
        dict(onednn=inner.packed, onednn_bias=inner.bias) if isinstance(inner, PackedLinear) else dict(module=module)
    )
    n, k = p.out_features, p.in_features
    if isinstance(p, FusedProduct):
        return ext.GemvWeight("dense", p.packed, None, None, p.bias, n, k, max_rows=p.max_rows, **large)
    if isinstance(p, FusedInt8Product):
        return ext.GemvWeight("int8", p.packed, p.scales, None, p.bias, n, k, max_rows=p.max_rows, **large)
    if isinstance(p, FusedInt4Product):  # our int4 kernel takes every row count (FusedInt4Product)
        w = p.packed
        return ext.GemvWeight("int4", w.codes, w.scales, w.offsets, p.bias, n, k, w.group_size)
    return None


def _norm(ext: ModuleType, module: nn.Module | None, dtype: torch.dtype):  # -> ext.RmsNormWeight | None
    if not isinstance(module, RMSNorm) or module.weight.dtype != dtype:
        return None
    return ext.RmsNormWeight(module.weight.detach().contiguous(), float(module.eps), float(module.offset))


def _layer(ext: ModuleType, parts: DecodeLayerParts, dtype: torch.dtype):  # -> ext.DecodeLayer | None
    attn = parts.attn
    linears = [_gemv(ext, m) for m in (parts.qkv, parts.o, parts.gate_up, parts.down)]
    norms = [_norm(ext, m, dtype) for m in (parts.input_norm, parts.post_attention_norm)]
    qk = [None if m is None else _norm(ext, m, dtype) for m in (parts.q_norm, parts.k_norm)]
    if (
        not isinstance(attn, FusedPagedAttention)
        or not all(isinstance(m, FusedRMSNorm) for m in (parts.input_norm, parts.post_attention_norm))
        or not (isinstance(parts.act, KernelActivation) and parts.act.kind == "silu")
        or any(g is None for g in linears)
        or any(n is None for n in norms)
        or any(n is None for n, m in zip(qk, (parts.q_norm, parts.k_norm)) if m is not None)
    ):
        return None
    qkv, o, gate_up, down = linears
    return ext.DecodeLayer(
        input_norm=norms[0],
        post_attention_norm=norms[1],
        q_norm=qk[0],
        k_norm=qk[1],
        qkv=qkv,
        o=o,
        gate_up=gate_up,
        down=down,
        num_heads=attn.num_heads,
        num_kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim,
        cache_slot=attn.layer_idx,
        scale=float(attn.scale),
        softcap=float(attn.softcap or 0.0),
        window=int(attn.sliding_window or 0),
    )


class CpuDecodeStack:
    """Decode-only steps through every layer in one C++ call (the GIL released); None for other steps."""

    def __init__(self, stack, dtype: torch.dtype, head_dims: set[int], modules: list[nn.Module]) -> None:
        self.stack = stack  # ext.DecodeStack
        self.dtype = dtype
        self.head_dims = head_dims
        self.modules = modules  # every module of the layers: one with a hook (the lab's trace, a user's) must be called

    def hooked(self) -> bool:
        return any(m._forward_pre_hooks or m._forward_hooks for m in self.modules)

    def __call__(
        self, h: torch.Tensor, rope: RopeStep, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # h (T, H) embeddings -> (h, residual) after the last layer
        cache = batch.kv_cache
        if (
            batch.max_query_len != 1
            or h.dtype != self.dtype
            or h.device.type != "cpu"
            or batch.attention.name != "torch"
            or rope.cos is None
            or batch.bidirectional
            or cache.spec.dtype != h.dtype
            or any(t.shape[-1] not in self.head_dims for t in (cache.k[0], cache.v[0]))
            or self.hooked()
        ):
            return None
        return self.stack.forward(
            h.contiguous(),
            None,
            rope.cos.contiguous(),
            rope.sin.contiguous(),
            cache.k,
            cache.v,
            batch.slot_mapping,
            batch.block_tables,
            batch.seq_lens,
        )


def build_decode_stack(
    ext: ModuleType, layers: list[DecodeLayerParts], modules: list[nn.Module]
) -> CpuDecodeStack | None:
    """The stack over `layers` when each is the plain shape on our kernels (after fused.py's swaps), else None.
    `modules`: every module the stack stands in for; a step where one of them has a hook runs them instead."""
    if not layers:
        return None
    dtype = layers[0].input_norm.weight.dtype
    if dtype not in FUSED_DTYPES:
        return None
    built = [_layer(ext, parts, dtype) for parts in layers]
    if any(layer is None for layer in built):
        return None
    head_dims = {parts.attn.head_dim for parts in layers}
    return CpuDecodeStack(ext.DecodeStack(built), dtype, head_dims, modules)
