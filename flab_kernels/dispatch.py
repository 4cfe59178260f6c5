"""Which implementation runs each op: the one dispatch rule, and the settings it reads.

Rule (every fused op; the quantized linears still choose their kernel per method at load): inside an engine, what
the engine chose when it started (`KernelSettings.triton`, set from its attention backend: the triton backend runs
every op's Triton kernel, the torch backend the torch math). Outside an engine (a kernel test or a benchmark
calling an op directly): Triton for CUDA tensors, or anywhere when `force_triton` is set (CPU tests run Triton
through the interpreter). On the Triton path `attention_kernel` forces the unified kernel or split-KV decode
(default: chosen per step).

The settings come from the environment (FLAB_FORCE_TRITON=0|1, FLAB_ATTENTION_KERNEL=auto|unified|split_kv),
read and validated ONCE: the engine calls `engine_kernel_settings` (backend/layers/attention_backends.py) when it
starts (a typo is an error then) and runs every load and forward inside `using(settings)`. Outside such a block
(a kernel test or a benchmark calling an op directly) the environment is read at the call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from flab_kernels._triton import HAS_TRITON

ATTENTION_KERNELS = ("auto", "unified", "split_kv")
_BOOLS = {"": False, "0": False, "1": True}


@dataclass(frozen=True)
class KernelSettings:
    force_triton: bool = False
    attention_kernel: str = "auto"
    triton: bool | None = None  # an engine's choice (its attention backend); None: by tensor device and force_triton

    def __post_init__(self) -> None:
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {self.attention_kernel!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "KernelSettings":
        force = environ.get("FLAB_FORCE_TRITON", "")
        if force not in _BOOLS:
            raise ValueError(f"FLAB_FORCE_TRITON must be 0 or 1, got {force!r}")
        kernel = environ.get("FLAB_ATTENTION_KERNEL", "auto") or "auto"
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"FLAB_ATTENTION_KERNEL must be one of {ATTENTION_KERNELS}, got {kernel!r}")
        return cls(_BOOLS[force], kernel)


_active: ContextVar[KernelSettings | None] = ContextVar("flab_kernel_settings", default=None)


@contextmanager
def using(settings: KernelSettings) -> Iterator[KernelSettings]:
    """Run the block (a model load, a forward) with these settings."""
    token = _active.set(settings)
    try:
        yield settings
    finally:
        _active.reset(token)


def current() -> KernelSettings:
    active = _active.get()
    return active if active is not None else KernelSettings.from_env()


def use_triton(t) -> bool:
    """The dispatch rule shared by every op (see the module docstring)."""
    settings = current()
    if settings.triton is not None:
        return HAS_TRITON and settings.triton
    return HAS_TRITON and (t.is_cuda or settings.force_triton)
