"""Per-step statistics and memory probes that every caller (UI, server, bench) can read."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import psutil
import torch


@dataclass
class MemorySnapshot:
    weights_bytes: int
    kv_cache_bytes: int  # allocated for the cache
    kv_used_bytes: int  # held by live blocks
    rss_bytes: int
    cuda_allocated_bytes: int = 0
    cuda_reserved_bytes: int = 0


@dataclass
class StepStats:
    step: int
    time: float  # seconds since the engine started
    duration: float  # seconds spent in the step
    batch_size: int
    prefill_tokens: int
    decode_tokens: int
    sampled_tokens: int
    tokens_per_s: float  # (prefill + decode) / duration
    output_tokens_per_s: float  # sampled / duration
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_hit_blocks: int  # cumulative
    preemptions: int  # cumulative
    memory: MemorySnapshot
    vision_s: float = 0.0  # seconds of `duration` the vision tower ran (image-text requests' first prefill)

    def to_dict(self) -> dict:
        return asdict(self)


def memory_snapshot(
    weights_bytes: int,
    kv_cache_bytes: int,
    kv_used_bytes: int,
    device: torch.device,
    process: psutil.Process | None = None,
) -> MemorySnapshot:
    """`process`: a kept psutil handle (building one per step reads /proc/<pid>/stat again: ~16 vs ~6 µs)."""
    rss = (process or psutil.Process()).memory_info().rss
    snap = MemorySnapshot(weights_bytes, kv_cache_bytes, kv_used_bytes, rss)
    if device.type == "cuda":
        snap.cuda_allocated_bytes = torch.cuda.memory_allocated(device)
        snap.cuda_reserved_bytes = torch.cuda.memory_reserved(device)
    return snap


@dataclass(frozen=True)
class KVBlock:
    """One KV cache block as the app's KV map draws it."""

    block: int
    owners: list[int]  # ids of the running requests whose block table holds it
    ref_count: int
    cached: bool  # holds a full block published to the prefix cache (reusable after it is freed)
    image_tokens: int = 0  # of its tokens, image placeholders (their KV comes from image features)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine between steps (`Engine.stats()`): queues, KV blocks, cumulative counters."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int  # referenced by a request
    kv_blocks_cached: int  # free but holding a reusable prefix
    block_size: int
    max_model_len: int
    prompt_tokens: int  # prompt tokens of finished-or-running requests that reached the model (cumulative)
    generation_tokens: int  # sampled tokens (cumulative)
    prefix_queried_blocks: int  # full prompt blocks looked up in the prefix cache (cumulative)
    prefix_hit_blocks: int  # of those, found (cumulative)
    num_preemptions: int
    num_steps: int
    finished: dict[str, int]  # finished requests by finish reason (cumulative)
    started_at: float  # time.perf_counter() when the engine started: StepStats.time is seconds since then
    last_step: StepStats | None

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks held by requests (0..1)."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_blocks / self.prefix_queried_blocks if self.prefix_queried_blocks else 0.0


class Metrics:
    """A bounded, thread-safe history of StepStats."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self.start = time.perf_counter()
        self._history: deque[StepStats] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.total_steps = 0
        self.process = psutil.Process()  # this process, for the RSS of every step

    def record(self, stats: StepStats) -> None:
        with self._lock:
            self._history.append(stats)
            self.total_steps += 1

    def history(self, since_step: int = -1) -> list[StepStats]:
        with self._lock:
            return [s for s in self._history if s.step > since_step]

    def last(self) -> StepStats | None:
        with self._lock:
            return self._history[-1] if self._history else None

    def reset(self) -> None:
        with self._lock:
            self._history.clear()
