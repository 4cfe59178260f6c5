"""The host's caps on one request, on the Benchmark tab, and on the model size (checked before any download).

Each refusal is a HostingError whose message is what the visitor sees: the value asked, the cap, what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from backend.core.kv_sizing import free_memory
from backend.hosting.errors import HostingError
from backend.hosting.policy import HostPolicy
from backend.units import format_bytes


def clamp_request(policy: HostPolicy, max_new_tokens: int | None, default: int) -> int:
    """The output length to use when the visitor did not choose one (`max_new_tokens` None): `default`, cut to
    the host's cap; a chosen value is returned as it is (check_request refuses it when over the cap)."""
    value = default if max_new_tokens is None else max_new_tokens
    if max_new_tokens is None and policy.max_new_tokens is not None:
        value = min(value, policy.max_new_tokens)
    return value


def check_request(policy: HostPolicy, *, max_new_tokens: int | None = None, prompt_tokens: int | None = None) -> None:
    """Refuse a request over the host's caps on output tokens or prompt tokens (per prompt)."""
    cap = policy.max_new_tokens
    if cap is not None and max_new_tokens is not None and max_new_tokens > cap:
        raise HostingError(
            f"max new tokens {max_new_tokens} is over this host's cap of {cap}: ask for at most {cap} new tokens"
        )
    cap = policy.max_prompt_tokens
    if cap is not None and prompt_tokens is not None and prompt_tokens > cap:
        raise HostingError(
            f"the prompt is {prompt_tokens} tokens, over this host's cap of {cap} prompt tokens: shorten it"
        )


def check_image_count(policy: HostPolicy, count: int) -> None:
    """Refuse a request with more images than the host allows in one request."""
    cap = policy.max_images_per_request
    if cap is not None and count > cap:
        allowed = f"at most {cap}" if cap else "none (this host takes text only)"
        raise HostingError(f"{count} images in one request; this host allows {allowed}: send fewer images")


def check_benchmark(policy: HostPolicy) -> None:
    """The Benchmark tab replaces the shared engine: refused to visitors unless the host allows it."""
    if not policy.allow_benchmark:
        raise HostingError(
            "the Benchmark tab is for the host only on this host (it replaces the engine everyone shares); "
            "run the app on your own machine to benchmark"
        )


@dataclass(frozen=True)
class ModelSettings:
    """The load settings the memory estimate depends on (Engine's arguments of the same names)."""

    dtype: str = "auto"
    quantization: str | None = None
    context_len: int = 4096  # tokens per sequence the KV cache is sized for (without a KV budget)
    num_seqs: int = 1  # sequences held at once (without a KV budget)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N" (anything else: the CPU's memory)
    revision: str | None = None
    kv_cache_memory_gb: float | None = None  # a KV budget asked for: the cache the engine allocates is this budget
    max_model_len: int | None = None  # with a KV budget: the context asked for (None: the model's)
    block_size: int = 16


def check_model_fits(
    name: str,
    settings: ModelSettings,
    policy: HostPolicy,
    *,
    token: str | None = None,
    free: Callable[[str], tuple[int, str]] = free_memory,
    allow_local_paths: bool = True,
):
    """Refuse `name` when its estimated memory (weights + KV cache at `settings`) is over the free memory of the
    device. Reads safetensors headers and config.json only (backend/loading/memory.py). Returns the
    MemoryEstimate, or None when the policy does not check memory or `name` is a built-in not built yet (the
    built-ins are small; the project builds them itself)."""
    if not policy.check_memory:
        return None
    from backend.loading.builtin import builtin_path, find_builtin
    from backend.loading.memory import EngineKVSettings, estimate_memory

    target = str(name).strip()
    builtin = find_builtin(target)
    if builtin is not None:
        folder = builtin_path(builtin.name)
        if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
            return None
        target = str(folder)
    engine = None
    if settings.kv_cache_memory_gb is not None:  # what the engine will allocate: the budget asked, in whole blocks
        engine = EngineKVSettings(
            settings.block_size, settings.kv_cache_memory_gb, None, settings.max_model_len, settings.device
        )
    estimate = estimate_memory(
        target,
        dtype=settings.dtype,
        quantization=settings.quantization,
        context_len=settings.context_len,
        num_seqs=settings.num_seqs,
        engine=engine,
        revision=settings.revision,
        token=token,
        allow_local_paths=allow_local_paths,
    )
    available, what = free(settings.device)
    if estimate.peak_bytes > available:
        kv_what = (
            f"the KV budget asked, {settings.kv_cache_memory_gb * 1024:g} MiB"
            if engine is not None
            else f"for {settings.num_seqs} x {settings.context_len} tokens"
        )
        loading = (
            f"; {format_bytes(estimate.load_peak_bytes)} while loading, before its MoE experts are quantized"
            if estimate.load_peak_bytes > estimate.total_bytes
            else ""
        )
        raise HostingError(
            f"{name} does not fit this machine: it needs about {format_bytes(estimate.total_bytes)} "
            f"(weights {format_bytes(estimate.weight_bytes)} + KV cache {format_bytes(estimate.kv_cache_bytes)} "
            f"{kv_what}{loading}) and the machine has "
            f"{format_bytes(available)} {what}; pick a smaller model, a quantization (int8, int4) or a shorter "
            "context, or a smaller KV budget"
        )
    return estimate
