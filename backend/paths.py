"""The one folder the project writes to: built-in models, the trained toy, converted GGUF models, bench outputs.

`$FLAB_CACHE_DIR` when set, else `$XDG_CACHE_HOME/fallback_lab`, else `~/.cache/fallback_lab`. Read from the
environment on every call (no module-level state), so tests and the app can point it elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FLAB_CACHE_DIR"
CACHE_NAME = "fallback_lab"


def cache_dir() -> Path:
    """The project's cache folder (not created here)."""
    root = os.environ.get(CACHE_ENV, "").strip()
    if root:
        return Path(os.path.expandvars(root)).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache") / CACHE_NAME


def models_dir() -> Path:
    """Where built-in models are built or converted (one sub-folder per model)."""
    return cache_dir() / "models"


def bench_dir() -> Path:
    """Where benchmark results are written by default."""
    return cache_dir() / "bench"
