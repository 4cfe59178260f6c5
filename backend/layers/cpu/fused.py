"""Our C++ CPU kernels (flab_kernels/cpu) in the model: GEMV linears (bf16, fp32, int8), RMSNorm, paged decode.

`use_cpu_kernels(model, ext)` runs once at load, after the CPU linear swaps of build.py:
- every bf16 / fp32 linear (plain, oneDNN `PackedLinear`, `UpcastLinear`, and the shared product of
  `SiblingLinear` groups) gets a copy of its weight packed for our GEMV (flab_kernels/cpu/ops.py); products of
  up to `FUSED_MAX_ROWS` rows (decode steps) run our kernel, which streams the weight once across both cores;
  larger ones (prefill, big batches) run the module it wraps, whose oneDNN / AMX GEMM is faster there. The two
  copies cost the weights' bytes twice; a decode step reads only ours (build.py `decode_weight_bytes`).
- int8 weight-only linears (on-the-fly `int8`: per-row symmetric scales) the same way: our int8 GEMV for
  decode rows (codes widened to fp32 in registers, per-row scales at the end), the quantized module above.
- native models' `RMSNorm` modules run the fused kernel for bf16 / fp32 activations, and their `PagedAttention`
  our paged decode kernel on decode-only steps (no gather of the context). The SiLU-and-mul kernel is built and
  tested but not used: without a vectorized exp it is 2-5x slower than torch's silu (measured, 1-32 rows).
Both implementations get the linears; the norms and attention are the native models' (transformers
runs its own modules, and the torch attention path through our attention function).
The loaded extension module is kept on each module (`kernels`): no module-level state.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from backend.core.forward_batch import ForwardBatch
from backend.layers.attention import PagedAttention
from backend.layers.cpu.packed import PackedLinear
from backend.layers.cpu.siblings import SiblingLinear, SiblingProduct
from backend.layers.cpu.upcast import UpcastLinear
from backend.layers.norm import RMSNorm
from flab_kernels.cpu import ops

FUSED_MAX_ROWS = 4  # up to this many rows our GEMV; above, the wrapped module's GEMM (oneDNN) is faster
FUSED_DTYPES = ops.PACKED_DTYPES


class FusedProduct:
    """`x @ W.T + b` by our kernel for few rows of W's dtype (else None: the caller's own product). A plain object."""

    def __init__(self, ext: ModuleType, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.ext = ext
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = ops.pack_weight(weight)  # bf16 (NB, KP, 16, 2) / fp32 (NB, K, 16)
        self.bias = None if bias is None else bias.detach().float().contiguous()  # (N,) fp32

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:  # (..., K) -> (..., N) or None
        if x.dtype != self.dtype or x.numel() > FUSED_MAX_ROWS * self.in_features or x.device.type != "cpu":
            return None
        return ops.linear(self.ext, x, self.packed, self.bias, self.out_features)


class FusedInt8Product:
    """Weight-only int8 (backend/quantization int8: codes (N, K), one scale per row) by our kernel for few rows;
    None for more (the quantized module's own product)."""

    def __init__(self, ext: ModuleType, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.ext = ext
        self.out_features, self.in_features = q.shape
        self.packed = ops.pack_int8_weight(q)  # (NB, K, 16) int8
        self.scales = scales.detach().float().contiguous()  # (N,)
        self.bias = None if bias is None else bias.detach().float().contiguous()  # (N,) fp32

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:  # (..., K) -> (..., N) or None
        if x.dtype not in FUSED_DTYPES or x.numel() > FUSED_MAX_ROWS * self.in_features or x.device.type != "cpu":
            return None
        return ops.linear_int8(self.ext, x, self.packed, self.scales, self.bias, self.out_features)


class FusedLinear(nn.Module):
    """A linear whose few-row products run our GEMV; `inner` (the module it replaced) computes the rest."""

    def __init__(self, inner: nn.Module, product: FusedProduct | FusedInt8Product) -> None:
        super().__init__()
        self.inner = inner
        self.product = product
        self.in_features, self.out_features = product.in_features, product.out_features
        self.register_buffer("fused_packed", product.packed, persistent=False)
        self.register_buffer("fused_scales", getattr(product, "scales", None), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # (N, K), for introspection
        return self.inner.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        out = self.product(x)
        return self.inner(x) if out is None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, C++ GEMV up to {FUSED_MAX_ROWS} rows"


class FusedRMSNorm(RMSNorm):
    """RMSNorm (+ residual add) by our kernel for bf16 / fp32 activations of the weight's dtype."""

    kernels: ModuleType

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.dtype != self.weight.dtype or x.dtype not in FUSED_DTYPES or x.device.type != "cpu":
            return super().forward(x, residual)
        return ops.rms_norm(self.kernels, x, self.weight, self.eps, residual, self.offset)


class FusedPagedAttention(PagedAttention):
    """Decode-only steps on the torch attention backend: our paged decode kernel reads the K/V blocks in place
    (threads split by sequence and KV head). Prefill and mixed steps, other backends and padded cache slots run
    the shared path (PagedAttention)."""

    kernels: ModuleType

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, sinks: torch.Tensor | None = None
    ) -> torch.Tensor:  # q: (T, Hq * D), k/v: (T, Hkv * D) -> (T, Hq * D)
        k_cache, v_cache = batch.kv_cache.k[self.layer_idx], batch.kv_cache.v[self.layer_idx]
        if (
            batch.max_query_len != 1
            or batch.attention.name != "torch"
            or q.device.type != "cpu"
            or q.dtype not in FUSED_DTYPES
            or k_cache.dtype != q.dtype
            or k_cache.shape[-1] != self.head_dim
            or v_cache.shape[-1] != self.head_dim
        ):
            return super().forward(q, k, v, batch, sinks)
        t = q.shape[0]
        hkv, d = self.num_kv_heads, self.head_dim
        batch.attention.store(k.view(t, hkv, d), v.view(t, hkv, d), k_cache, v_cache, batch.slot_mapping)
        out = ops.paged_decode(
            self.kernels,
            q.view(t, self.num_heads, d),
            k_cache,
            v_cache,
            batch.block_tables,
            batch.seq_lens,
            self.scale,
            self.softcap,
            self.sliding_window,
            sinks,
        )  # (T, Hq, D)
        return out.view(t, self.num_heads * d)


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a linear our GEMV can take over, else None."""
    if isinstance(module, (PackedLinear, UpcastLinear)) or type(module) is nn.Linear:
        weight = module.weight.detach()  # PackedLinear: converted back from oneDNN's layout, exactly
        if weight.dtype in FUSED_DTYPES and weight.device.type == "cpu" and not weight.is_meta:
            return weight, module.bias
    return None


def _is_int8_per_row(module: nn.Module) -> bool:
    """An on-the-fly int8 linear (backend/quantization/intquant.py) with (N, K) int8 codes, one symmetric scale per
    output row and no column permutation, on CPU (its `cpu_int8pack` or torch kernel)."""
    if getattr(module, "bits", None) != 8 or getattr(module, "kernel", None) not in ("cpu_int8pack", "torch"):
        return False
    q, scales = getattr(module, "w_q", None), getattr(module, "w_scales", None)
    return (
        q is not None
        and q.dtype == torch.int8
        and q.device.type == "cpu"
        and q.shape == (module.out_features, module.in_features)
        and scales is not None
        and scales.numel() == module.out_features
        and module.w_zeros is None
        and module.w_perm is None
    )


def fuse_linears(model: nn.Module, ext: ModuleType) -> int:
    """Wrap every linear our GEMV can run in a FusedLinear, and give sibling groups' shared product ours; in place.
    Returns how many linears (siblings counted one each) run our kernel."""
    count = 0
    products: dict[int, FusedProduct] = {}  # SiblingProduct -> ours (one per group)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SiblingLinear):
                shared: SiblingProduct = child.product
                if id(shared) not in products:
                    weight = shared.packed.to_dense()  # (sum N, K)
                    if weight.dtype not in FUSED_DTYPES:
                        continue
                    products[id(shared)] = shared.fused = FusedProduct(ext, weight, shared.bias)
                    child.register_buffer("fused_packed", shared.fused.packed, persistent=False)
                count += 1
                continue
            found = _linear_weight(child)
            if found is not None:
                setattr(parent, name, FusedLinear(child, FusedProduct(ext, *found)))
                count += 1
            elif _is_int8_per_row(child):
                product = FusedInt8Product(ext, child.w_q, child.w_scales.reshape(-1), child.bias)
                setattr(parent, name, FusedLinear(child, product))
                count += 1
    return count


def fuse_native_layers(model: nn.Module, ext: ModuleType) -> int:
    """Native models: RMSNorms and paged attention layers run our kernels; returns how many modules."""
    count = 0
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = FusedRMSNorm
        elif type(module) is PagedAttention:
            module.__class__ = FusedPagedAttention
        else:
            continue
        module.kernels = ext
        count += 1
    return count


def use_cpu_kernels(model: nn.Module, ext: ModuleType, native: bool) -> int:
    """The model's linears (and, native, its norms and activations) on our kernels; returns how many modules."""
    return fuse_linears(model, ext) + (fuse_native_layers(model, ext) if native else 0)
