"""How big the KV cache is and how long a sequence it holds, from the settings: the engine's sizing rule, in one
place, so the memory estimate (backend/loading/memory.py) shows the context and cache the engine will get.

Budget: `num_kv_blocks` blocks if given, else `kv_cache_memory_gb`, else 80% of free CUDA memory, else (CPU) a
quarter of the available memory capped at 1 GiB. Context: `max_model_len` if given (refused above the model's
own), else what the budget holds, up to the model's context. Bytes per token: KVCacheSpec.bytes_per_token.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from backend.core.errors import KVCacheError
from backend.core.kv_cache import KVCacheSpec, plan_num_blocks
from backend.units import format_bytes

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
DEFAULT_CONTEXT = 4096  # a config that names no context
CPU_BUDGET_SHARE = 0.25
CPU_BUDGET_CAP = 2**30
CUDA_BUDGET_SHARE = 0.8


@dataclass(frozen=True)
class KVPlan:
    max_model_len: int  # the longest sequence the engine accepts
    num_blocks: int
    block_size: int
    bytes_per_token: int
    budget_bytes: int

    @property
    def cache_bytes(self) -> int:
        """What the cache tensors take: whole blocks."""
        return self.num_blocks * self.block_size * self.bytes_per_token

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def full_sequences(self) -> int:
        """How many sequences of max_model_len tokens fit at once."""
        return self.tokens // self.max_model_len if self.max_model_len else 0


def model_context_len(config) -> int:
    """The model's own context from its config (a transformers config or the config.json dict); a VLM's is its
    language model's (the text sub-config)."""
    text = config.get("text_config") if isinstance(config, dict) else _text_config(config)
    if text is not None and text is not config:
        return model_context_len(text)
    for name in CONTEXT_KEYS:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_CONTEXT


def _text_config(config):
    try:
        return config.get_text_config() if hasattr(config, "get_text_config") else None
    except ValueError:  # several text configs
        return None


def kv_budget_bytes(
    spec: KVCacheSpec,
    device: torch.device,
    kv_cache_memory_gb: float | None = None,
    num_kv_blocks: int | None = None,
) -> int:
    if num_kv_blocks is not None:
        return num_kv_blocks * spec.bytes_per_block
    if kv_cache_memory_gb is not None:
        return int(kv_cache_memory_gb * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_BUDGET_SHARE)
    return min(int(psutil.virtual_memory().available * CPU_BUDGET_SHARE), CPU_BUDGET_CAP)


def plan_kv_cache(
    spec: KVCacheSpec,
    model_len: int,
    device: torch.device,
    kv_cache_memory_gb: float | None = None,
    num_kv_blocks: int | None = None,
    max_model_len: int | None = None,
) -> KVPlan:
    """The engine's context and block count for these settings; KVCacheError when they cannot work."""
    if max_model_len is not None and max_model_len > model_len:
        raise KVCacheError(f"max_model_len={max_model_len} exceeds the model's context of {model_len} tokens")
    budget = kv_budget_bytes(spec, device, kv_cache_memory_gb, num_kv_blocks)
    if max_model_len is None:  # take what the budget holds, up to the model's context
        max_len = min(model_len, (budget // spec.bytes_per_block) * spec.block_size)
        if max_len < spec.block_size:
            raise KVCacheError(
                f"the KV cache budget ({budget / 2**20:.1f} MiB) holds no block of "
                f"{spec.block_size} tokens ({spec.bytes_per_block / 2**20:.2f} MiB each)"
            )
    else:
        max_len = max_model_len
    num_blocks = plan_num_blocks(spec, budget, max_len)
    return KVPlan(max_len, num_blocks, spec.block_size, spec.bytes_per_token(), budget)


def free_memory(device: torch.device | str) -> tuple[int, str]:
    """(free bytes, what was measured) on `device`: CUDA's free memory on a cuda device ("auto": cuda when there is
    one, as the engine picks), else the available RAM."""
    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        free, _total = torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())
        return int(free), f"free GPU memory on {device}"
    return int(psutil.virtual_memory().available), "available RAM"


def check_kv_fits(
    plan: KVPlan, device: torch.device, kv_cache_memory_gb: float | None, num_kv_blocks: int | None
) -> None:
    """Before the cache is allocated: a budget the caller chose (`kv_cache_memory_gb` or `num_kv_blocks`) whose
    cache is over the device's free memory raises KVCacheError naming the option, the amount and what is free
    (instead of the allocator's RuntimeError). The automatic budget is a share of free memory: nothing to check."""
    if num_kv_blocks is not None:
        option = f"num_kv_blocks={num_kv_blocks}"
    elif kv_cache_memory_gb is not None:
        option = f"kv_cache_memory_gb={kv_cache_memory_gb:g}"
    else:
        return
    available, what = free_memory(device)
    if plan.cache_bytes > available:
        raise KVCacheError(
            f"{option} asks for a KV cache of {format_bytes(plan.cache_bytes)} and the machine has "
            f"{format_bytes(available)} {what} (after the weights): ask for at most "
            f"{available / 2**30:.2f} GiB, or leave the budget unset to size it automatically"
        )
