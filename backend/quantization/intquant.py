"""Integer weight quantization shared by int8, int4, GPTQ, AWQ and compressed-tensors: math and runtime.

Every integer method ends in the same canonical form, handed to `IntLinearBase._set_int_weight`:

    q       (N, K) int8, centered codes: code - 2**(bits-1)  (int4: -8..7, int8: -128..127)
    scales  (N, G) float, G = ceil(K / group_size)
    zeros   (N, G) float holding small integers, the centered zero code, or None (symmetric: 0)
    g_idx   (K,) group of each input column, or None (= k // group_size)
    W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g]

which is then laid out for the kernel in use (chosen once, at finalize, from the device):

    cpu_int8pack : 8 bit, one group, symmetric        torch._weight_int8pack_mm  (fp32/bf16/fp16)
    cpu_int4pack : 4 bit, N % 16 == 0, group 32..256  torch._weight_int4pack_mm_for_cpu (fp32/bf16/fp16);
                   zeros become the float offset -z*s, rounded once to the activation dtype
    triton       : CUDA (or FLAB_FORCE_TRITON=1 / kernel="triton" on CPU under TRITON_INTERPRET=1)
    torch        : anything else; keeps the packed codes, dequantizes per forward (exact reference)

GPTQ act-order (desc_act) g_idx: when every group has exactly group_size columns (what GPTQ writes),
the input columns are permuted once at finalize so groups become contiguous, and the forward gathers
x[:, perm] (one index_select) — all kernels apply. Any other g_idx keeps the torch path.
"""

from __future__ import annotations

import torch

from backend.core.errors import QuantizationError
from backend.quantization.base import KERNELS, QuantLinearBase
from flab_kernels.dispatch import current
from flab_kernels.quant_torch import (
    dequantize_weight,
    int4pack_eligible,
    int4pack_linear,
    int4pack_scales_and_zeros,
    int4pack_weight,
    int8pack_linear,
    pack_int4_nibbles,
    quant_matmul_torch,
)


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def quantize_groupwise(
    w: torch.Tensor,  # (N, K) float
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest min/max quantization -> (q centered int8 (N, K), scales (N, G), zeros (N, G) | None).

    Symmetric: scale = absmax / (2**(bits-1) - 1), codes in [-(2**(bits-1)-1), 2**(bits-1)-1], no zeros.
    Asymmetric: the range [min(w, 0), max(w, 0)] maps onto 0..2**bits-1 with an integer zero code
    (GPTQ's convention, so the result exports exactly to GPTQ/AWQ/compressed-tensors).
    Scales are rounded to `scale_dtype` first and the codes computed with the rounded scales.
    Error bound per element: symmetric <= scale / 2; asymmetric <= scale (zero-code rounding shifts the
    grid by up to half a step).
    """
    n, k = w.shape
    g = num_groups(k, group_size)
    pad = g * group_size - k
    wf = w.float()
    if pad:
        wf = torch.nn.functional.pad(wf, (0, pad))
    wg = wf.view(n, g, group_size)  # (N, G, gs)
    half = 2 ** (bits - 1)
    if symmetric:
        scales = (wg.abs().amax(-1) / (half - 1)).to(scale_dtype)  # (N, G)
        s = torch.where(scales == 0, torch.ones_like(scales), scales).float()
        q = torch.round(wg / s[..., None]).clamp(-half, half - 1)
        zeros = None
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        scales = ((hi - lo) / (2 * half - 1)).to(scale_dtype)  # (N, G)
        s = torch.where(scales == 0, torch.ones_like(scales), scales).float()
        zero_code = torch.round(-lo / s).clamp(0, 2 * half - 1)  # (N, G)
        q = (torch.round(wg / s[..., None]) + zero_code[..., None]).clamp(0, 2 * half - 1) - half
        zeros = zero_code - half
        scales = s.to(scale_dtype)
    q = q.view(n, g * group_size)[:, :k].to(torch.int8)
    return q, scales, zeros


def contiguous_group_perm(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """perm such that g_idx[perm] == arange(K) // group_size, or None when no such permutation exists."""
    k = g_idx.numel()
    perm = torch.argsort(g_idx.long(), stable=True)
    expected = torch.arange(k, device=g_idx.device) // group_size
    return perm if torch.equal(g_idx.long()[perm], expected) else None


def force_triton() -> bool:
    """The force_triton kernel setting in effect (flab_kernels/dispatch.py; the engine validates it at start)."""
    return current().force_triton


class IntLinearBase(QuantLinearBase):
    """Runtime of all integer weight-only methods; subclasses turn checkpoint tensors into the canonical form."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        prefix: str,
        bits: int,
        group_size: int,
        kernel: str = "auto",
    ) -> None:
        super().__init__(in_features, out_features, bias, prefix)
        if bits not in (4, 8):
            raise QuantizationError(f"{prefix}: {bits}-bit weights are not supported (4 and 8 are)")
        if kernel not in KERNELS:
            raise QuantizationError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.bits = bits
        self.group_size = group_size
        self.kernel_pref = kernel
        self.symmetric = True
        for name in ("w_q", "w_scales", "w_zeros", "w_perm", "w_gidx"):
            self.register_buffer(name, None)

    # ---- canonical form -> kernel layout -------------------------------------------------------------------
    def _choose_kernel(self, zeros: torch.Tensor | None, contiguous: bool) -> str:
        g = num_groups(self.in_features, self.group_size)
        if self.kernel_pref == "torch" or not contiguous:
            return "torch"
        if self.kernel_pref == "triton" or self.device.type == "cuda" or force_triton():
            from flab_kernels.quant_matmul import block_k_for

            return "triton" if block_k_for(self.group_size, g) is not None else "torch"
        if self.act_dtype == torch.float32:
            # torch's CPU pack kernels run a slow path for fp32 activations (1536x576, 16 rows: int8pack 12 ms,
            # int4pack 24 ms vs 1-2 ms to dequantize and multiply in fp32); they are fast for bf16/fp16.
            return "torch"
        if self.bits == 8 and g == 1 and zeros is None:
            return "cpu_int8pack"
        if self.bits == 4 and int4pack_eligible(self.out_features, self.in_features, self.group_size):
            return "cpu_int4pack"
        return "torch"

    def _set_int_weight(
        self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, g_idx: torch.Tensor | None = None
    ) -> None:
        """Take the canonical form (see module docstring) and lay it out for the kernel."""
        n, k = self.out_features, self.in_features
        g = num_groups(k, self.group_size)
        if tuple(q.shape) != (n, k) or tuple(scales.shape) != (n, g):
            raise QuantizationError(
                f"{self._where()}: internal shape mismatch q{tuple(q.shape)} scales{tuple(scales.shape)}"
            )
        if zeros is not None and bool((zeros == 0).all()):
            zeros = None
        self.symmetric = zeros is None
        dev, dt = self.device, self.act_dtype
        q = q.to(dev)
        scales = scales.to(device=dev, dtype=dt)
        zeros = zeros.to(device=dev, dtype=dt) if zeros is not None else None
        perm = None
        if g_idx is not None:
            g_idx = g_idx.to(dev).long()
            if torch.equal(g_idx, torch.arange(k, device=dev) // self.group_size):
                g_idx = None
            else:
                perm = contiguous_group_perm(g_idx, self.group_size)
                if perm is not None:
                    q, g_idx = q[:, perm], None
        self.kernel = self._choose_kernel(zeros, contiguous=g_idx is None)
        self.w_perm, self.w_gidx = perm, g_idx
        if self.kernel == "cpu_int8pack":
            self.w_q, self.w_scales, self.w_zeros = q.contiguous(), scales[:, 0].contiguous(), None  # (N, K), (N,)
        elif self.kernel == "cpu_int4pack":
            self.w_q = int4pack_weight(q)  # (N, K/2) torch's blocked layout
            self.w_scales, self.w_zeros = int4pack_scales_and_zeros(scales, zeros), None  # (G, N, 2)
        else:
            self.w_q = pack_int4_nibbles(q) if self.bits == 4 else q.contiguous()  # (N, K/2) | (N, K)
            self.w_scales, self.w_zeros = scales.contiguous(), zeros

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = self._prepare_input(x)  # (M, K)
        if self.w_perm is not None:
            x2 = x2.index_select(1, self.w_perm)
        mode = "int4" if self.bits == 4 else "int8"
        if self.kernel == "cpu_int8pack":
            y = int8pack_linear(x2, self.w_q, self.w_scales, self.bias)
        elif self.kernel == "cpu_int4pack":
            y = int4pack_linear(x2, self.w_q, self.group_size, self.w_scales, self.bias)
        elif self.kernel == "triton":
            from flab_kernels.quant_matmul import quant_matmul_triton

            y = quant_matmul_triton(x2, self.w_q, self.w_scales, self.w_zeros, self.group_size, mode, self.bias)
        else:
            y = quant_matmul_torch(
                x2, self.w_q, self.w_scales, self.w_zeros, self.group_size, mode, self.bias, self.w_gidx
            )
        return y.reshape(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:  # (N, K) float32, in the checkpoint's column order
        k = self.in_features
        if self.kernel == "cpu_int8pack":
            w = self.w_q.float() * self.w_scales.float()[:, None]
        elif self.kernel == "cpu_int4pack":
            # torch's blocked layout is opaque: read the weight back through the kernel itself.
            eye = torch.eye(k, dtype=self.act_dtype, device=self.w_q.device)
            w = int4pack_linear(eye, self.w_q, self.group_size, self.w_scales).float().t()
        else:
            w = dequantize_weight(
                self.w_q,
                self.w_scales,
                self.w_zeros,
                self.group_size,
                "int4" if self.bits == 4 else "int8",
                k,
                self.w_gidx,
            )
        if self.w_perm is not None:
            out = torch.empty_like(w)
            out[:, self.w_perm] = w
            w = out
        return w

    def describe(self) -> str:
        group = "channel" if num_groups(self.in_features, self.group_size) == 1 else f"group={self.group_size}"
        sym = "sym" if self.symmetric else "asym"
        order = ", act_order" if self.w_perm is not None or self.w_gidx is not None else ""
        return f"method={self.method}, bits={self.bits}, {group}, {sym}{order}, W{self.bits}A16"


class OnTheFlyIntLinear(IntLinearBase):
    """Integer weights quantized from a full-precision checkpoint as the weight arrives (int8, int4)."""

    quantize_symmetric: bool = True  # int8: symmetric scales; int4: scales and zero points

    def checkpoint_tensor_names(self) -> set[str]:
        return {"weight", "bias"}

    def output_dim(self, name: str) -> int | None:
        self._check_name(name)
        return 0  # weight (N, K), bias (N,)

    def _load(self, name: str, tensor: torch.Tensor) -> None:
        self._check_shape(name, tensor, (self.out_features, self.in_features))
        if not tensor.is_floating_point():
            raise QuantizationError(
                f"{self._where()}: weight is {tensor.dtype}, on-the-fly {self.method} needs a float weight"
            )
        # (N, K) integer codes, (N, G) scales, (N, G) zero points or None when symmetric
        q, scales, zeros = quantize_groupwise(
            tensor.to(self.device), self.bits, self.group_size, self.quantize_symmetric, self.act_dtype
        )
        self._set_int_weight(q, scales, None if self.quantize_symmetric else zeros)
