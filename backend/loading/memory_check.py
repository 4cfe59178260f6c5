"""The engine's own memory check before it loads anything (for Python API users; the app and the server check
before any download, backend/hosting/limits.py): a local checkpoint's weights + the KV budget asked + the load peak,
from its safetensors headers (backend/loading/memory.py), against the device's free memory.

Only what needs no network is checked here: a local folder, or a built-in model already built. A Hub id is checked
by the faces before its download, and every KV budget again before the cache is allocated
(backend/kv_sizing.check_kv_fits). An estimate that cannot be made (an unusual checkpoint) checks nothing: the
loader gives its own error for what it cannot load.
"""

from __future__ import annotations

import logging
from pathlib import Path

from backend.core.config import EngineConfig
from backend.core.errors import EngineError, KVCacheError
from backend.core.kv_sizing import free_memory
from backend.units import format_bytes

logger = logging.getLogger(__name__)


def local_checkpoint(cfg: EngineConfig) -> Path | None:
    """The folder `cfg.model` names when it is on disk already (a built-in already built, or a local folder when
    allowed); None otherwise."""
    from backend.loading.builtin import builtin_path, find_builtin

    try:
        builtin = find_builtin(cfg.model)
    except EngineError:
        return None
    folder = builtin_path(builtin.name) if builtin is not None else Path(cfg.model).expanduser()
    if builtin is None and not cfg.allow_local_paths:
        return None
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    return None


def check_before_load(cfg: EngineConfig) -> None:
    """Raise KVCacheError (a KV budget was asked) or EngineError when weights + that KV budget + the load peak are
    over the free memory of the device, naming the option, the amounts and what is free. Tensor parallelism
    splits the weights across ranks: not checked here."""
    if cfg.tp_size > 1:
        return
    folder = local_checkpoint(cfg)
    if folder is None:
        return
    from backend.loading.memory import EngineKVSettings, estimate_memory

    asked = cfg.kv_cache_memory_gb is not None or cfg.num_kv_blocks is not None
    kv = EngineKVSettings(cfg.block_size, cfg.kv_cache_memory_gb, cfg.num_kv_blocks, cfg.max_model_len, cfg.device)
    try:
        est = estimate_memory(str(folder), dtype=cfg.dtype, quantization=cfg.quantization, engine=kv if asked else None)
    except KVCacheError:
        raise
    except Exception as e:  # no estimate: the loader reports what it cannot load
        logger.debug("no memory estimate before loading %s: %s", folder, e)
        return
    kv_bytes = est.kv_cache_bytes if asked else 0
    need = max(est.weight_bytes + kv_bytes, est.load_peak_bytes + kv_bytes)
    available, what = free_memory(cfg.torch_device)
    if need <= available:
        return
    peak = f" (the load peak {format_bytes(est.load_peak_bytes)})" if est.load_peak_bytes > est.weight_bytes else ""
    weights = f"the weights {format_bytes(est.weight_bytes)}{peak}"
    if not asked:
        raise EngineError(
            f"{cfg.model} does not fit: {weights} and the machine has {format_bytes(available)} {what}; pick a "
            "quantization (int8, int4) or a smaller model"
        )
    option = (
        f"num_kv_blocks={cfg.num_kv_blocks}"
        if cfg.num_kv_blocks is not None
        else f"kv_cache_memory_gb={cfg.kv_cache_memory_gb:g}"
    )
    raise KVCacheError(
        f"{option} asks for a KV cache of {format_bytes(kv_bytes)}; with {weights} that is "
        f"{format_bytes(need)} and the machine has {format_bytes(available)} {what}: ask for a smaller budget, "
        "or leave it unset to size it automatically"
    )
