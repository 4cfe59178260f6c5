"""Engine: the public API. add_request / step / generate / stream / abort / close.

One step is: schedule -> run -> update. A background thread runs steps while several callers stream
at once (UI, server); without it, `generate` drives the steps itself.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable

import psutil
import torch

from backend.build import LoadedModel, load_model
from backend.config import EngineConfig
from backend.detokenizer import Detokenizer
from backend.errors import KVCacheError, RequestError
from backend.host_allocator import keep_freed_memory
from backend.kv_cache import BlockAllocator, KVCache, KVCacheSpec, plan_num_blocks
from backend.metrics import Metrics, StepStats, memory_snapshot
from backend.outputs import RequestOutput, StreamDelta
from backend.runner import ModelRunner
from backend.sampling import PromptLogprobs, SamplingParams, TopLogprobs
from backend.scheduler import Scheduler
from backend.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    seq: Sequence
    prompt: str | None
    emitted_text: int = 0  # characters of seq.text already streamed
    emitted_tokens: int = 0
    listener: queue.Queue | None = None
    done: threading.Event = field(default_factory=threading.Event)
    prompt_logprobs: list[float | None] | None = None  # filled as the prefill advances
    prompt_top_logprobs: list[TopLogprobs | None] | None = None
    detokenizer: Detokenizer | None = None  # seq.text, one new token at a time

    def store_prompt_logprobs(self, scored: PromptLogprobs) -> None:
        end = scored.start + len(scored.logprobs)
        self.prompt_logprobs[scored.start : end] = scored.logprobs
        if self.prompt_top_logprobs is not None:
            self.prompt_top_logprobs[scored.start : end] = scored.top_logprobs


def kv_spec_from_config(config, dtype: torch.dtype, block_size: int) -> KVCacheSpec:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "multi_query_group_num", None) or heads
    return KVCacheSpec(config.num_hidden_layers, kv_heads, head_dim, dtype, block_size)


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of the stop strings starts in `text` (None: none occurs)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def model_max_len(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


class Engine:
    def __init__(
        self,
        model: str,
        model_impl: str = "auto",
        quantization: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
        progress: Callable | None = None,
        **engine_options,
    ) -> None:
        self.config = EngineConfig.from_kwargs(
            model,
            model_impl=model_impl,
            quantization=quantization,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            **engine_options,
        )
        cfg = self.config
        self.malloc_tuned = cfg.keep_freed_memory and cfg.torch_device.type == "cpu" and keep_freed_memory()
        self.loaded: LoadedModel = load_model(cfg, progress)
        self.tokenizer = self.loaded.tokenizer
        self.device = self.loaded.device
        self.model_impl = self.loaded.impl
        self.attention_backend = (
            cfg.attention_backend
            if cfg.attention_backend != "auto"
            else ("triton" if self.device.type == "cuda" else "torch")
        )
        spec = kv_spec_from_config(self.loaded.hf_config, self.loaded.dtype, cfg.block_size)
        self.max_model_len, num_blocks = self._size_kv_cache(spec)
        self.kv_cache = KVCache(spec, num_blocks, self.device)
        self.allocator = BlockAllocator(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.runner = ModelRunner(
            self.loaded.model,
            self.kv_cache,
            self.device,
            self.attention_backend,
            torch.float32 if self.loaded.cpu_upcast else None,
        )
        self.metrics = Metrics()
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        self._rng = random.Random(cfg.seed)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._loop: threading.Thread | None = None
        self._closed = False

    # --- setup ----------------------------------------------------------------------------------

    def _size_kv_cache(self, spec: KVCacheSpec) -> tuple[int, int]:
        cfg = self.config
        model_len = model_max_len(self.loaded.hf_config)
        if cfg.max_model_len is not None and cfg.max_model_len > model_len:
            raise KVCacheError(f"max_model_len={cfg.max_model_len} exceeds the model's context of {model_len} tokens")
        if cfg.num_kv_blocks is not None:
            budget = cfg.num_kv_blocks * spec.bytes_per_block
        elif cfg.kv_cache_memory_gb is not None:
            budget = int(cfg.kv_cache_memory_gb * 2**30)
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.8)
        else:
            budget = min(int(psutil.virtual_memory().available * 0.25), 2**30)  # CPU: 1 GiB unless asked
        if cfg.max_model_len is None:  # take what the budget holds, up to the model's context
            max_len = min(model_len, (budget // spec.bytes_per_block) * spec.block_size)
            if max_len < spec.block_size:
                raise KVCacheError(
                    f"the KV cache budget ({budget / 2**20:.1f} MiB) holds no block of "
                    f"{spec.block_size} tokens ({spec.bytes_per_block / 2**20:.2f} MiB each)"
                )
        else:
            max_len = cfg.max_model_len
        return max_len, plan_num_blocks(spec, budget, max_len)

    # --- requests -------------------------------------------------------------------------------

    def _encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt must be a non-empty string")
        return self.tokenizer.encode(prompt)

    def add_request(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        _listener: queue.Queue | None = None,
    ) -> int:
        """Queue a request; returns its id. Raises RequestError for bad input (nothing is queued then)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError("params must be a SamplingParams")
        ids = list(prompt_token_ids) if prompt_token_ids is not None else self._encode(prompt)
        vocab = self.loaded.hf_config.get_text_config().vocab_size
        if not ids:
            raise RequestError("the prompt is empty (no tokens)")
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; the context holds {self.max_model_len} "
                "(prompt plus at least one new token): shorten it"
            )
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        generator = None if params.greedy else torch.Generator(device=self.device).manual_seed(seed)
        with self._lock:
            if self._closed:
                raise RequestError("the engine is closed")
            rid = self._next_id
            self._next_id += 1
            seq = Sequence(rid, ids, params, generator)
            req = _Request(
                seq, prompt, listener=_listener, detokenizer=Detokenizer(self.tokenizer, params.skip_special_tokens)
            )
            if params.prompt_logprobs is not None:
                req.prompt_logprobs = [None] * len(ids)
                req.prompt_top_logprobs = [None] * len(ids) if params.prompt_logprobs else None
            self._requests[rid] = req
            self.scheduler.add(seq)
            self._wake.notify_all()
        return rid

    def abort(self, request_id: int) -> None:
        """Cancel a request; its KV blocks are freed at once."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.seq.is_finished:
                return
            self.scheduler.finish(req.seq, "abort")
            self._publish(req, None)

    # --- the step -------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_work()

    def step(self) -> list[StreamDelta]:
        with self._lock:
            t0 = time.perf_counter()
            batch = self.scheduler.schedule()
            if not batch.seqs:
                return []
            prefill_tokens = batch.num_prefill_tokens
            try:
                out = self.runner.run(batch)
            except Exception as e:  # a failing forward must not take the engine down
                logger.exception("model step failed")
                for seq in list(batch.seqs):
                    seq.error = f"{type(e).__name__}: {e}"
                    self.scheduler.finish(seq, "error")
                return [self._publish(self._requests[s.seq_id], None) for s in batch.seqs]
            self.scheduler.update(batch, {})
            for seq_id, scored in out.prompt_logprobs.items():
                self._requests[seq_id].store_prompt_logprobs(scored)
            sampled = [s for s, flag in zip(batch.seqs, batch.sample) if flag]
            now = time.perf_counter()
            touched = []
            for i, seq in enumerate(sampled):
                self._append_token(seq, out.token_ids[i], out, i, now)
                touched.append(seq)
            stats = self._record(batch, prefill_tokens, len(sampled), now - t0)
            return [self._publish(self._requests[s.seq_id], stats) for s in touched]

    def _append_token(self, seq: Sequence, token: int, out, row: int, now: float) -> None:
        seq.output_token_ids.append(token)
        if out.logprobs is not None and seq.params.logprobs is not None:
            seq.output_logprobs.append(out.logprobs[row])
            seq.output_top_logprobs.append(out.top_logprobs[row])
        if seq.first_token_time is None:
            seq.first_token_time = now
        p = seq.params
        detok = self._requests[seq.seq_id].detokenizer
        seq.text = detok.add(seq.output_token_ids)
        reason = None
        if (token in self.loaded.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif p.stop and _first_stop(seq.text, p.stop) is not None:
            reason = "stop"
        if reason is None and (len(seq.output_token_ids) >= p.max_new_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            text = detok.finish(seq.output_token_ids)  # exact: one full decode
            cut = _first_stop(text, p.stop) if p.stop else None
            seq.text = text if cut is None else text[:cut]
            self.scheduler.finish(seq, reason)

    def _record(self, batch, prefill_tokens: int, sampled: int, duration: float) -> StepStats:
        alloc = self.allocator
        duration = max(duration, 1e-9)
        stats = StepStats(
            step=self.metrics.total_steps,
            time=time.perf_counter() - self.metrics.start,
            duration=duration,
            batch_size=len(batch),
            prefill_tokens=prefill_tokens,
            decode_tokens=batch.num_tokens - prefill_tokens,
            sampled_tokens=sampled,
            tokens_per_s=batch.num_tokens / duration,
            output_tokens_per_s=sampled / duration,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=alloc.num_used,
            kv_blocks_total=alloc.num_blocks,
            prefix_hit_blocks=alloc.prefix_hits,
            preemptions=self.scheduler.num_preemptions,
            memory=memory_snapshot(
                self.weights_bytes,
                self.kv_cache.nbytes,
                alloc.num_used * self.kv_cache.spec.bytes_per_block,
                self.device,
                self.metrics.process,
            ),
        )
        self.metrics.record(stats)
        return stats

    def _publish(self, req: _Request, stats: StepStats | None) -> StreamDelta:
        """Build the delta since the last publish and hand it to the request's listener."""
        seq = req.seq
        finished = seq.is_finished
        text = seq.text
        if not finished:  # hold back what may be a partial stop string or a partial character
            hold = max((len(s) - 1 for s in seq.params.stop), default=0)
            end = len(text) - hold
            while end > req.emitted_text and text[end - 1] == "\ufffd":
                end -= 1
            text = text[: max(end, req.emitted_text)]
        delta = StreamDelta(
            seq.seq_id,
            text[req.emitted_text :],
            seq.output_token_ids[req.emitted_tokens :],
            finished,
            seq.finish_reason,
            self._output(req, text),
            stats,
        )
        req.emitted_text, req.emitted_tokens = len(text), len(seq.output_token_ids)
        if req.listener is not None:
            req.listener.put(delta)
        if finished:
            req.done.set()
        return delta

    def _output(self, req: _Request, text: str | None = None) -> RequestOutput:
        seq = req.seq
        want_lp = seq.params.logprobs is not None
        return RequestOutput(
            request_id=seq.seq_id,
            prompt=req.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=seq.text if text is None else text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.output_logprobs) if want_lp else None,
            top_logprobs=list(seq.output_top_logprobs) if want_lp else None,
            prompt_logprobs=None if req.prompt_logprobs is None else list(req.prompt_logprobs),
            prompt_top_logprobs=None if req.prompt_top_logprobs is None else list(req.prompt_top_logprobs),
            num_cached_tokens=seq.num_cached_tokens,
            num_preemptions=seq.num_preemptions,
            ttft=seq.ttft,
            latency=None if seq.finish_time is None else seq.finish_time - seq.arrival_time,
            error=seq.error,
        )

    # --- high-level API -------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | list[str] | None = None,
        sampling_params: SamplingParams | list | None = None,
        prompt_token_ids: list[list[int]] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        items = [(p, None) for p in prompts] if prompts is not None else [(None, ids) for ids in prompt_token_ids or []]
        if not items:
            raise RequestError("give prompts or prompt_token_ids")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(items)
        if len(params) != len(items):
            raise RequestError("sampling_params must be one SamplingParams or one per prompt")
        ids = []
        try:
            for (prompt, token_ids), p in zip(items, params):
                ids.append(self.add_request(prompt, p, prompt_token_ids=token_ids))
        except Exception:
            for rid in ids:  # a bad prompt in the list: queue nothing
                self.abort(rid)
            raise
        reqs = [self._requests[rid] for rid in ids]
        if self._loop is not None and self._loop.is_alive():
            for r in reqs:
                r.done.wait()
        else:
            while not all(r.seq.is_finished for r in reqs):
                self.step()
        with self._lock:
            outputs = [self._output(r) for r in reqs]
            for rid in ids:
                self._requests.pop(rid, None)
        return outputs

    def stream(
        self, prompt: str | None = None, params: SamplingParams | None = None, prompt_token_ids: list[int] | None = None
    ) -> Iterator[StreamDelta]:
        """Yield deltas as tokens are produced. Leaving the loop early aborts the request."""
        self.start_background_loop()
        listener: queue.Queue = queue.Queue()
        rid = self.add_request(prompt, params, prompt_token_ids, _listener=listener)
        finished = False
        try:
            while not finished:
                delta = listener.get()
                finished = delta.finished
                yield delta
        finally:
            if not finished:
                self.abort(rid)
            with self._lock:
                self._requests.pop(rid, None)

    def start_background_loop(self) -> None:
        with self._lock:
            if self._closed:
                raise RequestError("the engine is closed")
            if self._loop is None or not self._loop.is_alive():
                self._loop = threading.Thread(target=self._run_loop, name="engine-loop", daemon=True)
                self._loop.start()

    def _run_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self.scheduler.has_work():
                    self._wake.wait(timeout=1.0)
                if self._closed:
                    return
            self.step()
            time.sleep(0)  # let callers take the lock between steps

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for req in list(self._requests.values()):
                if not req.seq.is_finished:
                    self.scheduler.finish(req.seq, "abort")
                    self._publish(req, None)
            self._wake.notify_all()
        if self._loop is not None:
            self._loop.join(timeout=10)
        self.kv_cache.k.clear()
        self.kv_cache.v.clear()
        self.runner.model = None
        self.loaded.model = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- introspection --------------------------------------------------------------------------

    @property
    def weights_bytes(self) -> int:
        if not hasattr(self, "_weights_bytes"):
            self._weights_bytes = self.loaded.weights_bytes
        return self._weights_bytes

    def describe(self) -> dict:
        """What runs: implementation, injected/swapped modules, model shape, cache geometry (for UI and notebook)."""
        from backend.models.describe import describe_model

        info = describe_model(self.loaded.model)
        spec = self.kv_cache.spec
        info.update(
            model=self.config.model,
            path=str(self.loaded.path),
            requested_impl=self.config.model_impl,
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            device=str(self.device),
            quantization=self.loaded.quantization,
            quantized_modules=len(self.loaded.swapped_modules),
            attention_backend=self.attention_backend,
            malloc_keeps_freed_memory=self.malloc_tuned,
            weights_bytes=self.weights_bytes,
            kv_cache=dict(
                num_blocks=self.kv_cache.num_blocks,
                block_size=spec.block_size,
                layers=spec.num_layers,
                kv_heads=spec.num_kv_heads,
                head_dim=spec.head_dim,
                bytes=self.kv_cache.nbytes,
                max_model_len=self.max_model_len,
            ),
        )
        return info

    def kv_cache_view(self) -> list[dict]:
        """One entry per KV block: owners (request ids), reference count, whether it holds a cached prefix."""
        with self._lock:
            owners: list[list[int]] = [[] for _ in range(self.allocator.num_blocks)]
            for seq in self.scheduler.running:
                for b in seq.block_table:
                    owners[b].append(seq.seq_id)
            return [
                dict(
                    block=b,
                    owners=owners[b],
                    ref_count=self.allocator.ref_count[b],
                    cached=self.allocator.block_hash[b] is not None,
                )
                for b in range(self.allocator.num_blocks)
            ]

    def check_invariants(self) -> None:
        with self._lock:
            self.allocator.check_invariants(
                [s.block_table for s in self.scheduler.running + list(self.scheduler.waiting)]
            )
