"""Cut a loaded linear to a rank's part: some output rows (column parallel) or an input column range (row
parallel). Plain `nn.Linear` and every quantized linear: integer methods (int8, int4, GPTQ, AWQ,
compressed-tensors) and fp8 formats are read back to their canonical form (codes, scales, zero points, act-order
groups; backend/quantization/intquant.py) from whatever kernel layout they were given, sliced with their scales and
zero points, and laid out again for the kernel that suits the shard. The slice is exactly the rows / columns of
the full layer: the shard computes what the full layer computes for its outputs (or its partial sum)."""

from __future__ import annotations

import torch
from torch import nn

from backend.core.errors import UnsupportedModelError
from backend.quantization.base import QuantLinearBase
from backend.quantization.fp8 import Fp8LinearBase
from backend.quantization.intquant import IntLinearBase, num_groups
from flab_kernels.quant_torch import int4_codes, int4pack_linear


def ranges_index(ranges: list[tuple[int, int]], device: torch.device) -> torch.Tensor:  # (n,) int64
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges])


def take_rows(module: nn.Module, rows: torch.Tensor, where: str) -> nn.Module:
    """The layer restricted to output features `rows` (its bias too)."""
    if isinstance(module, IntLinearBase):
        q, scales, zeros, g_idx = int_canonical(module)
        bias = None if module.bias is None else module.bias[rows]
        _reset_int(module, q[rows], scales[rows], None if zeros is None else zeros[rows], g_idx, bias)
        return module
    if isinstance(module, Fp8LinearBase):
        bias = None if module.bias is None else module.bias[rows]
        _reset_fp8(module, module.w_q[rows], module.w_scales[rows], module.group_size, bias)
        return module
    if isinstance(module, nn.Linear) and not isinstance(module, QuantLinearBase):
        w = module.weight.detach()[rows]
        b = None if module.bias is None else module.bias.detach()[rows]
        return _linear(w, b)
    raise UnsupportedModelError(f"{where}: {type(module).__name__} layers cannot be split for tensor parallelism")


def take_cols(module: nn.Module, start: int, end: int, where: str) -> tuple[nn.Module, torch.Tensor | None]:
    """The layer restricted to input features [start, end), without its bias; returns (layer, bias) so the bias
    is added once, after the partial outputs are summed."""
    if isinstance(module, IntLinearBase):
        q, scales, zeros, g_idx = int_canonical(module)
        if g_idx is not None:
            raise UnsupportedModelError(
                f"{where}: act-order (desc_act) quantized weights cannot be split along their input features; "
                "use a checkpoint without act-order or tp_size=1"
            )
        bias = module.bias
        gs, g_slice = _group_slice(module.in_features, module.group_size, start, end, where)
        module.group_size = gs
        _reset_int(
            module, q[:, start:end], scales[:, g_slice], None if zeros is None else zeros[:, g_slice], None, None
        )
        return module, bias
    if isinstance(module, Fp8LinearBase):
        bias = module.bias
        gs, g_slice = _group_slice(module.in_features, module.group_size, start, end, where)
        _reset_fp8(module, module.w_q[:, start:end], module.w_scales[:, g_slice], gs, None)
        return module, bias
    if isinstance(module, nn.Linear) and not isinstance(module, QuantLinearBase):
        bias = None if module.bias is None else module.bias.detach()
        return _linear(module.weight.detach()[:, start:end], None), bias
    raise UnsupportedModelError(f"{where}: {type(module).__name__} layers cannot be split for tensor parallelism")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    n, k = weight.shape
    out = nn.Linear(k, n, bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return out


def _group_slice(k: int, group_size: int, start: int, end: int, where: str) -> tuple[int, slice]:
    """The shard's group size and its scale columns; shards must hold whole quantization groups."""
    if num_groups(k, group_size) == 1:
        return end - start, slice(0, 1)  # one scale per row: the same scale over the shard's columns
    if start % group_size or (end - start) % group_size:
        raise UnsupportedModelError(
            f"{where}: the shard's input features [{start}, {end}) do not hold whole quantization groups of "
            f"{group_size}; use a tp_size that keeps {k // group_size} groups whole per rank"
        )
    return group_size, slice(start // group_size, end // group_size)


def int_canonical(m: IntLinearBase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(q (N, K) centered int8 codes, scales (N, G), zeros (N, G) | None, g_idx (K,) | None) in the checkpoint's
    column order, read back from the layout of `m.kernel`."""
    n, k, gs = m.out_features, m.in_features, m.group_size
    g = num_groups(k, gs)
    zeros = None
    if m.kernel == "cpu_int8pack":
        q, scales = m.w_q, m.w_scales[:, None]  # (N, K), (N, 1)
    elif m.kernel == "cpu_int4pack":
        # torch's blocked layout is opaque: the kernel itself decodes it. With scale 1 and offset 0 each
        # output is one centered code, exactly (small integers are exact in every float dtype).
        unit = torch.zeros(g, n, 2, dtype=m.act_dtype, device=m.w_q.device)
        unit[..., 0] = 1
        eye = torch.eye(k, dtype=m.act_dtype, device=m.w_q.device)
        q = int4pack_linear(eye, m.w_q, gs, unit).t().round().to(torch.int8)  # (N, K)
        scales = m.w_scales[..., 0].t().contiguous()  # (N, G)
        offset = m.w_scales[..., 1].t().float()  # -z * s, rounded once to the activation dtype
        s = scales.float()
        zeros = torch.where(s == 0, torch.zeros_like(s), torch.round(-offset / torch.where(s == 0, 1, s)))
        zeros = None if bool((zeros == 0).all()) else zeros
    else:  # torch / triton: nibble-packed (4 bit) or plain (8 bit) codes, (N, G) scales and zeros
        q = (int4_codes(m.w_q, k).to(torch.int16) - 8).to(torch.int8) if m.bits == 4 else m.w_q
        scales, zeros = m.w_scales, m.w_zeros
    g_idx = m.w_gidx
    if m.w_perm is not None:  # stored columns are q[:, perm] with contiguous groups
        orig = torch.empty_like(q)
        orig[:, m.w_perm] = q
        q = orig
        g_idx = torch.empty(k, dtype=torch.long, device=q.device)
        g_idx[m.w_perm] = torch.arange(k, device=q.device) // gs
    return q, scales, zeros, g_idx


def _reset_int(m: IntLinearBase, q, scales, zeros, g_idx, bias) -> None:
    m.out_features, m.in_features = q.shape
    m.bias = bias
    m._set_int_weight(q, scales, zeros, g_idx)


def _reset_fp8(m: Fp8LinearBase, w, scales, group_size: int, bias) -> None:
    m.out_features, m.in_features = w.shape
    m.bias = bias
    m._set_fp8_weight(w.contiguous(), scales.contiguous(), group_size)
