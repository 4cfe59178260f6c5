"""Read-outs of an engine's state for the app, the server, the benchmarks and the notebook: pure functions of its
parts. The loop publishes a `StateSnapshot` between steps (an immutable value, swapped in with one reference
assignment), and `stats()`, `kv_cache_view()` and `num_requests` read the latest one: they take no lock, so they
never wait for a step's bookkeeping, let alone its forward."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from backend.core.kv_cache import BlockAllocator, BlockHash, KVCache
from backend.core.metrics import EngineStats, KVBlock, Metrics, StepStats, memory_snapshot
from backend.core.scheduler import ScheduledBatch, Scheduler


@dataclass(frozen=True)
class StateSnapshot:
    """What the read-outs show, as it was between two steps. Built by the thread that holds the engine's state
    lock (`take_snapshot`); read by any thread without it. `queued`: requests added while a step ran, still in the
    inbox (they wait too), counted by `with_queued` as they arrive."""

    num_running: int
    num_waiting: int  # in the scheduler's queue
    num_held: int  # requests the book holds (queued in the scheduler or running)
    queued: int
    kv_blocks_used: int
    prefix_queries: int
    prefix_hits: int
    num_preemptions: int
    num_steps: int
    prompt_tokens: int
    generation_tokens: int
    finished: Mapping[str, int]
    last_step: StepStats | None
    ref_counts: tuple[int, ...]  # per KV block
    block_hashes: tuple[BlockHash | None, ...]  # per KV block: the prefix it holds, if any
    block_tables: tuple[tuple[int, tuple[int, ...]], ...]  # (request id, its blocks) per running request
    image_tokens: tuple[tuple[int, int], ...] = ()  # (block, image placeholder tokens it holds), blocks with any

    def with_queued(self, n: int) -> StateSnapshot:
        return dataclasses.replace(self, queued=self.queued + n)


def take_snapshot(
    scheduler: Scheduler,
    metrics: Metrics,
    num_held: int,
    queued: int,
    prompt_tokens: int,
    generation_tokens: int,
    finished: Counter[str],
) -> StateSnapshot:
    """The state now (the caller holds the state lock). Copies are C-level (tuple of a list): a few microseconds per
    thousand blocks, once per step."""
    alloc = scheduler.allocator
    return StateSnapshot(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        num_held=num_held,
        queued=queued,
        kv_blocks_used=alloc.num_used,
        prefix_queries=alloc.prefix_queries,
        prefix_hits=alloc.prefix_hits,
        num_preemptions=scheduler.num_preemptions,
        num_steps=metrics.total_steps,
        prompt_tokens=prompt_tokens,
        generation_tokens=generation_tokens,
        finished=MappingProxyType(dict(finished)),
        last_step=metrics.last(),
        ref_counts=tuple(alloc.ref_count),
        block_hashes=tuple(alloc.block_hash),
        block_tables=tuple((seq.seq_id, tuple(seq.block_table)) for seq in scheduler.running),
        image_tokens=image_tokens_per_block(scheduler.running, alloc.block_size),
    )


def image_tokens_per_block(running, block_size: int) -> tuple[tuple[int, int], ...]:
    """(block, image placeholder tokens it holds) for the blocks of running image-text requests."""
    count: dict[int, int] = {}
    for seq in running:
        if getattr(seq, "images", None) is None:
            continue
        for i, n in seq.images.tokens_per_block(block_size):
            if i < len(seq.block_table):
                b = seq.block_table[i]
                count[b] = count.get(b, 0) + n
    return tuple(sorted(count.items()))


def engine_stats(snap: StateSnapshot, allocator: BlockAllocator, metrics: Metrics, max_model_len: int) -> EngineStats:
    """EngineStats from a snapshot; `allocator` and `metrics` give only what never changes (sizes, start time)."""
    cached = sum(1 for ref, h in zip(snap.ref_counts, snap.block_hashes) if ref == 0 and h is not None)
    return EngineStats(
        num_running=snap.num_running,
        num_waiting=snap.num_waiting + snap.queued,
        kv_blocks_total=allocator.num_blocks,
        kv_blocks_used=snap.kv_blocks_used,
        kv_blocks_cached=cached,
        block_size=allocator.block_size,
        max_model_len=max_model_len,
        prompt_tokens=snap.prompt_tokens,
        generation_tokens=snap.generation_tokens,
        prefix_queried_blocks=snap.prefix_queries,
        prefix_hit_blocks=snap.prefix_hits,
        num_preemptions=snap.num_preemptions,
        num_steps=snap.num_steps,
        finished=dict(snap.finished),
        started_at=metrics.start,
        last_step=snap.last_step,
    )


def kv_blocks(snap: StateSnapshot) -> list[KVBlock]:
    """One entry per KV block: owners (request ids), reference count, whether it holds a cached prefix."""
    owners: list[list[int]] = [[] for _ in snap.ref_counts]
    for seq_id, table in snap.block_tables:
        for b in table:
            owners[b].append(seq_id)
    image = dict(snap.image_tokens)
    return [
        KVBlock(b, owners[b], ref, snap.block_hashes[b] is not None, image.get(b, 0))
        for b, ref in enumerate(snap.ref_counts)
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
        cpu_kernel_rows=loaded.cpu_kernel_rows,
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
