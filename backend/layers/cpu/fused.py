"""Our C++ CPU kernels (flab_kernels/cpu) in the model: GEMV linears (bf16, fp32, int8, int4), RMSNorm, SiLU-and-mul,
paged decode.

`use_cpu_kernels(model, ext)` runs once at load, after the CPU linear swaps of build.py:
- every bf16 / fp32 linear (plain, oneDNN `PackedLinear`, `UpcastLinear`, and the shared product of
  `SiblingLinear` groups) gets a copy of its weight packed for our GEMV (flab_kernels/cpu/ops.py); products of
  up to the kernel's row limit (decode steps: 4 rows, 32 for bf16 on AVX512 / AMX, `ops.linear_max_rows`) run our
  kernel, which streams the weight once across both cores; larger ones (prefill, big batches) run the module it
  wraps, whose oneDNN GEMM is faster there. The two copies cost the weights' bytes twice; a decode step reads
  only ours (build.py `decode_weight_bytes`).
- int8 weight-only linears (on-the-fly `int8`: per-row symmetric scales) the same way, up to their row limit
  (every row count on AVX512: codes widened to fp32 in registers, or to bf16 pairs for AMX tiles; per-row scales
  at the end), the quantized module above it; int4 group-wise linears (contiguous groups: on-the-fly `int4`, GPTQ
  without act-order, ...) too, repacked to our layout (two codes a byte, 16 rows a block; per-group scale and
  offset), for every row count (csrc/tensor_ops.h `linear_int4` names the routes by row count).
- native models' `RMSNorm` modules run the fused kernel for bf16 / fp32 activations, SiLU MLPs (a module
  whose `act` is "silu": the dense MLP, MoE experts) our SiLU-and-mul (vectorized exp) through
  backend/layers/activation.py's `KernelActivation`, their `RotaryEmbedding` our in-place RoPE over the q | k
  columns of the qkv output (`cpu_kernel`), and their `PagedAttention` the K/V store (one call) and our paged
  decode kernel on decode-only steps (no gather of the context).
Both implementations get the linears; the norms are the native models' (transformers runs its own modules).
Decode attention: both implementations reach the kernel through the torch attention backend, which holds the same
loaded module (backend/layers/attention_backends.py `TorchAttention.cpu_kernels`): native layers through
`paged_attention` (marked `FusedPagedAttention`), the transformers implementation through the injected function.
The loaded extension module is kept on each module (`kernels`): no module-level state.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from backend.layers.activation import KernelActivation
from backend.layers.attention import PagedAttention
from backend.layers.cpu.packed import PackedLinear
from backend.layers.cpu.siblings import SiblingLinear, SiblingProduct
from backend.layers.cpu.upcast import UpcastLinear
from backend.layers.norm import RMSNorm
from backend.layers.rotary import RotaryEmbedding
from flab_kernels.cpu import ops
from flab_kernels.quant_torch import int4_codes

FUSED_DTYPES = ops.PACKED_DTYPES


@dataclass(frozen=True)
class KernelUse:
    """What `use_cpu_kernels` put on our kernels: how many modules, whether decode steps run the decode stack, and
    up to how many rows every 16-bit linear runs our product (0: there is none)."""

    modules: int
    stacked: bool
    max_rows: int


class FusedProduct:
    """`x @ W.T + b` by our kernel for up to `max_rows` rows of W's dtype (else None: the caller's own product). A
    plain object."""

    def __init__(self, ext: ModuleType, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.ext = ext
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = ops.pack_weight(weight)  # bf16 (NB, KP, 16, 2) / fp32 (NB, K, 16)
        self.bias = None if bias is None else bias.detach().float().contiguous()  # (N,) fp32
        self.max_rows = ops.linear_max_rows(ext, self.packed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:  # (..., K) -> (..., N) or None
        if x.dtype != self.dtype or x.numel() > self.max_rows * self.in_features or x.device.type != "cpu":
            return None
        return ops.linear(self.ext, x, self.packed, self.bias, self.out_features)


class FusedInt8Product:
    """Weight-only int8 (backend/quantization int8: codes (N, K), one scale per row) by our kernel up to `max_rows`
    rows (every row count on AVX512 / AMX: ahead of the quantized module's own product everywhere measured), None
    for more (the module's product)."""

    def __init__(self, ext: ModuleType, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.ext = ext
        self.out_features, self.in_features = q.shape
        self.packed = ops.pack_int8_weight(q)  # (NB, K, 16) int8
        self.scales = scales.detach().float().contiguous()  # (N,)
        self.bias = None if bias is None else bias.detach().float().contiguous()  # (N,) fp32
        self.max_rows = ops.linear_max_rows(ext, self.packed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:  # (..., K) -> (..., N) or None
        if x.dtype not in FUSED_DTYPES or x.numel() > self.max_rows * self.in_features or x.device.type != "cpu":
            return None
        return ops.linear_int8(self.ext, x, self.packed, self.scales, self.bias, self.out_features)


class FusedInt4Product:
    """Weight-only int4, group-wise (backend/quantization int4 with contiguous groups), by our kernel for every row
    count: the group-wise tile for few rows, AMX tiles or the weight dequantized once and torch's GEMM for many
    (faster than the module's own `cpu_int4pack` product at every count measured: docs/cpu_kernels.md). Packed
    from the module's codes, scales and zeros."""

    def __init__(self, ext: ModuleType, weight: ops.Int4Packed, n: int, k: int, bias: torch.Tensor | None) -> None:
        self.ext = ext
        self.out_features, self.in_features = n, k
        self.packed = weight
        self.bias = None if bias is None else bias.detach().float().contiguous()  # (N,) fp32

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:  # (..., K) -> (..., N) or None
        if x.dtype not in FUSED_DTYPES or x.device.type != "cpu":
            return None
        return ops.linear_int4(self.ext, x, self.packed, self.bias, self.out_features)


class FusedSiluAndMul:
    """SiLU-and-mul by our kernel (vectorized exp) for bf16 / fp32 CPU activations; None for others. A plain object,
    set as a native MLP's `act` through backend/layers/activation.py's `KernelActivation`."""

    def __init__(self, ext: ModuleType) -> None:
        self.ext = ext

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:  # (..., 2I) -> (..., I) or None
        if x.dtype not in FUSED_DTYPES or x.device.type != "cpu":
            return None
        return ops.silu_and_mul(self.ext, x)


class FusedRope:
    """Rotary embedding in place by our kernel (bf16 / fp32 rows of the cos / sin dtype), as RotaryEmbedding's
    `cpu_kernel`; False for inputs it does not take (the torch math runs)."""

    def __init__(self, ext: ModuleType, head_dim: int) -> None:
        self.ext = ext
        self.head_dim = head_dim

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> bool:
        if x.dtype not in FUSED_DTYPES or x.device.type != "cpu" or x.stride(-1) != 1 or cos.dtype != x.dtype:
            return False
        ops.rope_(self.ext, x, cos.contiguous(), sin.contiguous(), heads, self.head_dim)
        return True


class FusedLinear(nn.Module):
    """A linear whose few-row products run our GEMV; `inner` (the module it replaced) computes the rest."""

    def __init__(self, inner: nn.Module, product: FusedProduct | FusedInt8Product | FusedInt4Product) -> None:
        super().__init__()
        self.inner = inner
        self.product = product
        self.in_features, self.out_features = product.in_features, product.out_features
        if isinstance(product, FusedInt4Product):
            self.register_buffer("fused_packed", product.packed.codes, persistent=False)
            self.register_buffer("fused_scales", product.packed.scales, persistent=False)
            self.register_buffer("fused_offsets", product.packed.offsets, persistent=False)
        else:
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
        p = self.product
        every = isinstance(p, FusedInt4Product) or p.max_rows == p.ext.EVERY_ROW_COUNT
        rows = "every row count" if every else f"up to {p.max_rows} rows"
        return f"in_features={self.in_features}, out_features={self.out_features}, C++ kernel for {rows}"


class FusedRMSNorm(RMSNorm):
    """RMSNorm (+ residual add) by our kernel for bf16 / fp32 activations of the weight's dtype."""

    kernels: ModuleType

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.dtype != self.weight.dtype or x.dtype not in FUSED_DTYPES or x.device.type != "cpu":
            return super().forward(x, residual)
        return ops.rms_norm(self.kernels, x, self.weight, self.eps, residual, self.offset)


class FusedPagedAttention(PagedAttention):
    """A native attention layer of an engine whose torch attention backend holds our kernels: its decode rows run
    our paged decode kernel and the one-call K/V store through that backend (`TorchAttention.store` / `attend`,
    the path the transformers implementation takes too); prefills, other backends and calls the kernel does not
    take run the shared path. The class marks the layers the decode stack may take and the lab labels."""

    kernels: ModuleType


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


def _int4_groups(module: nn.Module) -> ops.Int4Packed | None:
    """An int4 linear (backend/quantization/intquant.py) with contiguous groups of even size, on CPU, as our int4
    packing; None for others. Codes, scales and zeros come from its `torch` layout (nibbles, (N, G) scales,
    centered zeros: w = (code - 8 - zero) * scale) or, for `cpu_int4pack` (torch's opaque blocked layout), from
    the weight read back through torch's kernel (`dequantize()`) and its (G, N, 2) scale / offset pairs: the codes
    are round((w - offset) / scale) + 8, exact because w's bf16 rounding is far below half a scale step."""
    if getattr(module, "bits", None) != 4 or getattr(module, "kernel", None) not in ("cpu_int4pack", "torch"):
        return None
    group = getattr(module, "group_size", 0)
    q = getattr(module, "w_q", None)
    if (
        q is None
        or q.device.type != "cpu"
        or group <= 0
        or group % 2
        or module.w_perm is not None
        or getattr(module, "w_gidx", None) is not None
    ):
        return None
    n, k = module.out_features, module.in_features
    if module.kernel == "torch":
        scales = module.w_scales.float()  # (N, G)
        zeros = module.w_zeros.float() if module.w_zeros is not None else torch.zeros_like(scales)
        return ops.pack_int4_weight(int4_codes(q, k), scales, -(8 + zeros) * scales, group)
    pairs = module.w_scales  # (G, N, 2): scale, offset (the model's dtype)
    scales, offsets = pairs[..., 0].t().float(), pairs[..., 1].t().float()  # (N, G)
    g = scales.shape[1]
    w = module.dequantize().view(n, g, group)  # (N, G, gs) fp32
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = torch.round((w - offsets[..., None]) / safe[..., None]) + 8
    codes = torch.where(scales[..., None] == 0, torch.full_like(codes, 8), codes).clamp(0, 15)
    codes = codes.view(n, k).to(torch.uint8)
    if pairs.dtype == torch.bfloat16:  # kept as they are (half the bytes of fp32), the code bias in the kernel
        return ops.pack_int4_weight(codes, pairs[..., 0].t(), pairs[..., 1].t(), group, centered=True)
    return ops.pack_int4_weight(codes, scales, offsets - 8 * scales, group)


def fuse_linears(model: nn.Module, ext: ModuleType) -> tuple[int, int]:
    """Wrap every linear our GEMV can run in a FusedLinear, and give sibling groups' shared product ours; in place.
    Returns (how many linears, siblings counted one each, run our kernel; the fewest rows a 16-bit one takes, 0
    when there is none: the quantized ones take more, int4 every row count)."""
    count, max_rows = 0, []
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
                    max_rows.append(shared.fused.max_rows)
                    child.register_buffer("fused_packed", shared.fused.packed, persistent=False)
                count += 1
                continue
            found = _linear_weight(child)
            if found is not None:
                product = FusedProduct(ext, *found)
                setattr(parent, name, FusedLinear(child, product))
                count += 1
                max_rows.append(product.max_rows)
            elif _is_int8_per_row(child):
                product = FusedInt8Product(ext, child.w_q, child.w_scales.reshape(-1), child.bias)
                setattr(parent, name, FusedLinear(child, product))
                count += 1
            elif (int4 := _int4_groups(child)) is not None:
                product = FusedInt4Product(ext, int4, child.out_features, child.in_features, child.bias)
                setattr(parent, name, FusedLinear(child, product))
                count += 1
    return count, min(max_rows, default=0)


def fuse_native_layers(model: nn.Module, ext: ModuleType) -> int:
    """Native models: RMSNorms, SiLU gated MLPs (and MoE experts: a module whose `act` is "silu") and paged
    attention layers run our kernels; returns how many modules."""
    count = 0
    silu = KernelActivation("silu", FusedSiluAndMul(ext))
    for module in model.modules():
        if getattr(module, "act", None) == "silu":
            module.act = silu
        elif isinstance(module, RotaryEmbedding):
            module.cpu_kernel = FusedRope(ext, module.head_dim)
        elif type(module) is RMSNorm:
            module.__class__ = FusedRMSNorm
        elif type(module) is PagedAttention:
            module.__class__ = FusedPagedAttention
        else:
            continue
        module.kernels = ext
        count += 1
    return count


def use_cpu_kernels(model: nn.Module, ext: ModuleType, native: bool) -> KernelUse:
    """The model's linears (and, native, its norms and activations) on our kernels, and a native model's decode
    steps in one C++ call where it offers them (`use_cpu_decode_stack`: backend/layers/cpu/decode_stack.py)."""
    count, max_rows = fuse_linears(model, ext)
    stacked = False
    if native:
        count += fuse_native_layers(model, ext)
        stack = getattr(model, "use_cpu_decode_stack", None)
        stacked = stack is not None and stack(ext)
    return KernelUse(count, stacked, max_rows)
