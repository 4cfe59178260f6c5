"""The engine's parts, built once from its frozen config: the kernel settings, the model (on this process or the
tensor-parallel ranks), the attention backend, the KV cache sized by the one sizing rule, the block allocator,
the scheduler and the runner. `Engine.__init__` calls `build_parts` and keeps what it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from backend.core.config import EngineConfig
from backend.core.errors import EngineError
from backend.core.host_allocator import keep_freed_memory, map_big_blocks
from backend.core.kv_cache import BlockAllocator, KVCache, KVCacheSpec
from backend.core.kv_sizing import check_kv_fits, model_context_len, plan_kv_cache
from backend.core.runner import ModelRunner
from backend.core.scheduler import Scheduler
from backend.layers.attention_backends import AttentionBackend, engine_kernel_settings, make_attention_backend
from backend.loading.build import LoadedModel, load_model
from backend.loading.memory_check import check_before_load
from backend.models.kv_layout import kv_cache_spec
from flab_kernels import dispatch as kernel_dispatch
from flab_kernels.dispatch import KernelSettings


@dataclass
class EngineParts:
    kernel_settings: KernelSettings  # every kernel override of the environment, read and validated once
    tp_group: object | None  # backend/distributed's TensorParallelGroup when tp_size > 1
    owns_tp_group: bool  # close() shuts the group down (else only unloads it)
    loaded: LoadedModel
    malloc_tuned: bool  # glibc keeps freed memory for the step loop (CPU)
    attention: AttentionBackend
    max_model_len: int
    kv_cache: KVCache
    allocator: BlockAllocator
    scheduler: Scheduler
    runner: ModelRunner  # or backend.distributed's DistributedRunner (the same interface)


def kv_spec_for(loaded: LoadedModel, block_size: int, attention: AttentionBackend) -> KVCacheSpec:
    """The KV cache layout the model reported at load (backend/models/kv_layout.py: native options or the probe)."""
    return kv_cache_spec(loaded.model, loaded.dtype, block_size, pad_head_dims=attention.pads_head_dims)


def build_parts(cfg: EngineConfig, progress: Callable | None, tp_group=None, own_tp_group: bool = False) -> EngineParts:
    """Check memory, load the model and build the parts around it. `tp_group`: a running TensorParallelGroup to
    load onto (which close() only unloads unless `own_tp_group`); without it, `tp_size` > 1 starts one."""
    try:
        settings = engine_kernel_settings(cfg.attention_backend, cfg.torch_device)
    except ValueError as e:
        raise EngineError(str(e)) from None
    check_before_load(cfg)  # weights + the KV budget asked + the load peak against free memory, before loading
    owns = tp_group is None or own_tp_group
    with kernel_dispatch.using(settings):
        if tp_group is None and cfg.tp_size > 1:
            from backend.distributed import TensorParallelGroup, TPOptions

            tp_group = TensorParallelGroup.start(TPOptions(cfg.tp_size), cfg.torch_device.type)
        try:
            loaded, malloc_tuned = _load(cfg, progress, tp_group)
            return _around(cfg, settings, tp_group, owns, loaded, malloc_tuned)
        except BaseException:
            if tp_group is not None and owns:
                tp_group.shutdown()
            raise


def _load(cfg: EngineConfig, progress: Callable | None, tp_group) -> tuple[LoadedModel, bool]:
    """The model, on this process or the tensor-parallel ranks. On CPU glibc maps big blocks on their own while it
    loads, then keeps freed memory for the step loop (`keep_freed_memory`, backend/core/host_allocator.py)."""
    tune_malloc = cfg.keep_freed_memory and cfg.torch_device.type == "cpu"
    if tune_malloc:
        map_big_blocks()
    try:
        loaded = tp_group.load(cfg, progress) if tp_group else load_model(cfg, progress)
    finally:
        tuned = tune_malloc and keep_freed_memory()
    return loaded, tuned


def _around(cfg: EngineConfig, settings, tp_group, owns: bool, loaded: LoadedModel, malloc_tuned: bool) -> EngineParts:
    """The parts around a loaded model: attention backend, KV cache (the one sizing rule), allocator, scheduler,
    runner."""
    device = loaded.device
    compute_dtype = torch.float32 if loaded.cpu_upcast else None
    attention = make_attention_backend(cfg.attention_backend, device, compute_dtype, loaded.cpu_kernel_module)
    spec = kv_spec_for(loaded, cfg.block_size, attention)
    plan = plan_kv_cache(  # backend/core/kv_sizing.py, which the memory estimate shares
        spec, model_context_len(loaded.hf_config), device, cfg.kv_cache_memory_gb, cfg.num_kv_blocks, cfg.max_model_len
    )
    check_kv_fits(plan, device, cfg.kv_cache_memory_gb, cfg.num_kv_blocks)  # before the allocator sees it
    kv_cache = KVCache(spec, plan.num_blocks, device)
    allocator = BlockAllocator(plan.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
    scheduler = Scheduler(allocator, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_running_per_owner)
    if tp_group is not None:
        from backend.distributed import DistributedRunner

        runner = DistributedRunner(tp_group, loaded.model, kv_cache, device, attention, owns_group=owns)
    else:
        runner = ModelRunner(loaded.model, kv_cache, device, attention)
    return EngineParts(
        settings, tp_group, owns, loaded, malloc_tuned, attention, plan.max_model_len, kv_cache, allocator, scheduler,
        runner,
    )  # fmt: skip
