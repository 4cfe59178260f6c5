"""ZeroGPU, honestly: this engine is refused there.

On a ZeroGPU Space the GPU exists only inside a `spaces.GPU`-decorated call, and CUDA state made inside one
call does not carry into the next. The engine keeps a background step loop and a paged KV cache (and the
weights) on its device for as long as it is loaded, across calls, so it cannot fit that model. A ZeroGPU Space
must be switched to CPU hardware or to a dedicated GPU (Settings -> Space hardware); `refuse_zerogpu()` at
start-up says so instead of failing later with a CUDA error.

Detection: SPACES_ZERO_GPU set true (as the `spaces` package reads it: 1/t/true), or an already-imported
`spaces` package whose config reports zero_gpu. `spaces` is never imported here (importing it patches torch
on ZeroGPU).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from backend.hosting.errors import HostingError

ZEROGPU_MESSAGE = (
    "this Space runs on ZeroGPU, where the GPU exists only during one decorated call; the Fallback Lab engine keeps "
    "its model, KV cache and step loop on the device between calls, so it cannot run there. In the Space's "
    "Settings, pick CPU hardware (free) or a dedicated GPU (e.g. T4, L4, A10G), then restart the Space"
)


def on_zerogpu(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true"):
        return True
    spaces = sys.modules.get("spaces")
    config = getattr(getattr(spaces, "config", None), "Config", None)
    return bool(getattr(config, "zero_gpu", False))


def refuse_zerogpu(environ: Mapping[str, str] | None = None) -> None:
    """Raise HostingError(ZEROGPU_MESSAGE) on ZeroGPU; call it once at start-up (app.py, launch_server)."""
    if on_zerogpu(environ):
        raise HostingError(ZEROGPU_MESSAGE)
