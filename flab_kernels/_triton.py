"""Guarded Triton import: the package imports (and the torch paths run) even where Triton is absent.

Kernel modules do `from flab_kernels._triton import triton, tl` and decorate with `@triton.jit`. Without
Triton, `triton.jit` is the identity and `tl.constexpr` a placeholder, so the modules still import;
the `*_triton` wrappers call `require_triton()` first and raise a clear error.
"""

from __future__ import annotations

from types import SimpleNamespace

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    HAS_TRITON = False

    def _cdiv(a: int, b: int) -> int:
        return -(-a // b)

    def _next_power_of_2(n: int) -> int:
        return 1 if n <= 1 else 1 << (n - 1).bit_length()

    triton = SimpleNamespace(jit=lambda fn=None, **_: fn, cdiv=_cdiv, next_power_of_2=_next_power_of_2)
    tl = SimpleNamespace(constexpr=object)


def require_triton() -> None:
    """Raise a clear error when a Triton kernel is called without Triton installed."""
    if not HAS_TRITON:
        raise RuntimeError(
            "Triton is not installed: use the torch implementations (flab_kernels.ops picks them on CPU)"
        )
