"""The offline default model: a tiny random-weight Llama with a real tokenizer, built once into a cache dir.

It lets the app start and run with no network and no download. Its output is gibberish by design:
the weights are random. Everything else (paged KV cache, batching, plots) is real.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

DEFAULT_CHOICE = "default:tiny-llama"  # the picker value that stands for the built-in model
DEFAULT_LABEL = "tiny-llama (random weights — for trying the app offline)"
DEFAULT_ARCH = "llama"
DEFAULT_KV_MB = 4.0  # a small cache keeps the block view readable (512 blocks of 16 tokens)
MODEL_KV_MB = 512.0  # a sensible budget for a real small model
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where the default model lives: $FLAB_CACHE_DIR, else $XDG_CACHE_HOME/fallback-lab, else ~/.cache/fallback-lab."""
    root = os.environ.get("FLAB_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fallback-lab"


def default_model_path(root: str | Path | None = None) -> Path:
    return Path(root or cache_dir()) / f"tiny-{DEFAULT_ARCH}-random"


def ensure_default_model(root: str | Path | None = None) -> Path:
    """Build the default model once (into a temp dir, then renamed into place); returns its folder."""
    target = default_model_path(root)
    with _lock:
        if all((target / name).exists() for name in _REQUIRED):
            return target
        from backend.tools.tiny_models import build_tiny_model

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
        try:
            build_tiny_model(DEFAULT_ARCH, tmp)
            if target.exists():  # a half-built leftover
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target


def resolve_choice(choice: str | None, root: str | Path | None = None) -> str:
    """Map a picker value to what Engine accepts: the default model's folder, a Hub id or a local path."""
    choice = (choice or "").strip()
    if not choice or choice == DEFAULT_CHOICE:
        return str(ensure_default_model(root))
    return os.path.expanduser(choice)


def is_default(choice: str | None) -> bool:
    return not (choice or "").strip() or choice == DEFAULT_CHOICE


def suggested_kv_mb(choice: str | None) -> float:
    return DEFAULT_KV_MB if is_default(choice) else MODEL_KV_MB
