"""Elementwise Triton helpers shared by several kernels."""

from __future__ import annotations

from flab_kernels._triton import tl, triton


@triton.jit
def tanh_f32(x):
    """tanh from exp2 (portable to the interpreter and every backend); exp of -2|x| never overflows."""
    e = tl.exp2(tl.abs(x) * -2.8853900817779268)  # exp(-2|x|) in (0, 1]
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)
