"""Read-outs of an engine's state for the app, the server, the benchmarks and the notebook: pure functions of its
parts. The engine calls them under its state lock, which its loop holds only between forwards (never across
one), so each read-out is a consistent snapshot taken between steps and never waits for a model forward."""

from __future__ import annotations

import time
from collections import Counter

import torch

from backend.core.kv_cache import BlockAllocator, KVCache
from backend.core.metrics import EngineStats, KVBlock, Metrics, StepStats, memory_snapshot
from backend.core.scheduler import ScheduledBatch, Scheduler


def engine_stats(
    scheduler: Scheduler,
    allocator: BlockAllocator,
    metrics: Metrics,
    max_model_len: int,
    prompt_tokens: int,
    generation_tokens: int,
    finished: Counter[str],
    queued: int = 0,
) -> EngineStats:
    """`queued`: requests added while a step ran, not yet in the scheduler (they wait too)."""
    return EngineStats(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting) + queued,
        kv_blocks_total=allocator.num_blocks,
        kv_blocks_used=allocator.num_used,
        kv_blocks_cached=allocator.num_cached_free,
        block_size=allocator.block_size,
        max_model_len=max_model_len,
        prompt_tokens=prompt_tokens,
        generation_tokens=generation_tokens,
        prefix_queried_blocks=allocator.prefix_queries,
        prefix_hit_blocks=allocator.prefix_hits,
        num_preemptions=scheduler.num_preemptions,
        num_steps=metrics.total_steps,
        finished=dict(finished),
        started_at=metrics.start,
        last_step=metrics.last(),
    )


def kv_blocks(scheduler: Scheduler, allocator: BlockAllocator) -> list[KVBlock]:
    """One entry per KV block: owners (request ids), reference count, whether it holds a cached prefix."""
    owners: list[list[int]] = [[] for _ in range(allocator.num_blocks)]
    image = [0] * allocator.num_blocks  # image placeholder tokens per block
    for seq in scheduler.running:
        for b in seq.block_table:
            owners[b].append(seq.seq_id)
        if getattr(seq, "images", None) is not None:
            for pos in seq.images.placeholder_positions.tolist():
                if pos // allocator.block_size < len(seq.block_table):
                    image[seq.block_table[pos // allocator.block_size]] += 1
    return [
        KVBlock(b, owners[b], allocator.ref_count[b], allocator.block_hash[b] is not None, image[b])
        for b in range(allocator.num_blocks)
    ]


def step_stats(
    batch: ScheduledBatch,
    scheduler: Scheduler,
    kv_cache: KVCache,
    metrics: Metrics,
    weights_bytes: int,
    device: torch.device,
    prefill_tokens: int,
    sampled: int,
    duration: float,
    vision_s: float = 0.0,
) -> StepStats:
    """The StepStats of a step that just ran (recorded into `metrics`)."""
    alloc = scheduler.allocator
    duration = max(duration, 1e-9)
    stats = StepStats(
        step=metrics.total_steps,
        time=time.perf_counter() - metrics.start,
        duration=duration,
        batch_size=len(batch),
        prefill_tokens=prefill_tokens,
        decode_tokens=batch.num_tokens - prefill_tokens,
        sampled_tokens=sampled,
        tokens_per_s=batch.num_tokens / duration,
        output_tokens_per_s=sampled / duration,
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        kv_blocks_used=alloc.num_used,
        kv_blocks_total=alloc.num_blocks,
        prefix_hit_blocks=alloc.prefix_hits,
        preemptions=scheduler.num_preemptions,
        memory=memory_snapshot(
            weights_bytes,
            kv_cache.nbytes,
            alloc.num_used * kv_cache.spec.bytes_per_block,
            device,
            metrics.process,
        ),
        vision_s=vision_s,
    )
    metrics.record(stats)
    return stats


def describe_engine(engine) -> dict:
    """What runs: implementation, injected/swapped modules, model shape, cache geometry (Engine.describe)."""
    from backend.models.describe import describe_model
    from backend.multimodal.inputs import describe_images

    loaded, kv_cache = engine.loaded, engine.kv_cache
    info = describe_model(loaded.model)
    spec = kv_cache.spec
    info.update(
        model=engine.config.model,
        path=str(loaded.path),
        requested_impl=engine.config.model_impl,
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(engine.device),
        quantization=loaded.quantization,
        quantized_modules=len(loaded.swapped_modules),
        attention_backend=engine.attention_backend,
        attention_compute_dtype=str(engine.attention.compute_dtype or loaded.dtype).removeprefix("torch."),
        malloc_keeps_freed_memory=engine.malloc_tuned,
        cpu_linear=loaded.cpu_linear,
        cpu_linears=loaded.num_cpu_linears,
        cpu_kernels=loaded.cpu_kernels,
        cpu_kernels_reason=loaded.cpu_kernels_reason,
        decode_weight_bytes=engine.decode_weight_bytes,
        images=describe_images(loaded.processor),  # an image-text model: its processor, or why none
        weights_bytes=engine.weights_bytes,
        kv_cache=dict(
            num_blocks=kv_cache.num_blocks,
            block_size=spec.block_size,
            bytes=kv_cache.nbytes,
            max_model_len=engine.max_model_len,
            **spec.describe(),  # layers, slots, bytes per token, heads and head sizes (per slot when they differ)
        ),
    )
    layout = engine.runner.describe()  # a tensor-parallel runner: per rank its device, weight and KV bytes, heads
    if layout is not None:
        info["tensor_parallel"] = layout
    return info
