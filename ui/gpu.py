"""ZeroGPU on Hugging Face Spaces: decorate GPU work with spaces.GPU only when the `spaces` package exists."""

from __future__ import annotations

from typing import Callable


def gpu(fn: Callable, duration: int = 120) -> Callable:
    """`spaces.GPU(duration=...)(fn)` on Spaces (ZeroGPU attaches a GPU for the call); `fn` itself elsewhere."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)


def on_spaces() -> bool:
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True
