"""Where the app runs: a Hugging Face Space or not (SPACE_ID). ZeroGPU is refused at start-up (backend/hosting/
zerogpu.py: the engine keeps its model, KV cache and step loop on the device between calls), so nothing here
wraps callbacks with `spaces.GPU` and the `spaces` package is never imported (importing it patches torch)."""

from __future__ import annotations

import os
from collections.abc import Mapping


def on_spaces(environ: Mapping[str, str] | None = None) -> bool:
    """True on a Hugging Face Space (the Space runtime sets SPACE_ID)."""
    env = os.environ if environ is None else environ
    return bool(env.get("SPACE_ID", "").strip())
