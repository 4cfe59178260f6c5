"""Engine: the public API. add_request / step / generate / stream / abort / close, and the read-outs
(stats, step_history, kv_cache_view, describe, reset_prefix_cache) that the app, the server, the benchmarks
and the notebook use. Nothing outside backend/ reads the engine's parts.

One step is: schedule -> run -> update. A background thread runs steps while several callers stream at once
(UI, server); without it, `generate` drives the steps itself.

Failures stay with the request they belong to: a request whose sampling, stop handling or output fails is
finished with finish_reason "error" (and `error` set) while the rest of its batch goes on; a model forward
that raises fails the requests of that batch; any other exception in a step fails the requests of that step
and the engine keeps serving. `generate()` and `stream()` raise `RequestFailedError` for such a request;
`step()` callers see finish_reason "error" with the error text on the finished delta.

`owner` (a visitor, an API key) makes scheduling fair across owners (backend/scheduler.py).

A finished request's state is dropped once its final output is handed over: `generate()` returns it,
`stream()` yields it, and `step()` returns it as the finished delta (take it from there). A request added with
`add_request()` that finishes in a step run by the background loop (started by a `stream()` caller) waits in
a bounded outbox until `take_finished()` collects it.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable

import torch

from backend.checks import is_int
from backend.config import EngineConfig
from backend.detokenizer import Detokenizer
from backend.errors import EngineError, RequestError, RequestFailedError
from backend.host_allocator import keep_freed_memory, map_big_blocks
from backend.kv_cache import BlockAllocator, KVCache, KVCacheSpec
from backend.kv_sizing import model_context_len, plan_kv_cache
from backend.layers.attention_backends import AttentionBackend, make_attention_backend
from backend.loading.build import LoadedModel, load_model
from backend.metrics import EngineStats, KVBlock, Metrics, StepStats, memory_snapshot
from backend.models.kv_layout import kv_cache_spec
from backend.outputs import RequestOutput, StreamDelta
from backend.runner import ModelRunner
from backend.sampling import PromptLogprobs, SamplingParams, TopLogprobs
from backend.scheduler import ScheduledBatch, Scheduler
from backend.sequence import Sequence
from backend.stop import StopMatcher
from flab_kernels import dispatch as kernel_dispatch
from flab_kernels.dispatch import KernelSettings

logger = logging.getLogger(__name__)

LISTENER_POLL_S = 0.5  # how often a waiting stream checks that the engine loop is alive
OUTBOX_SIZE = 10_000  # finished add_request() outputs kept for take_finished() (oldest dropped beyond)


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
    detokenizer: Detokenizer | None = None  # seq.text, one new token at a time (None: no tokenizer)
    stops: StopMatcher = field(default_factory=lambda: StopMatcher(()))
    final: RequestOutput | None = None  # set when it finishes
    manual: bool = False  # added by add_request(): its caller reads step() or take_finished()

    def store_prompt_logprobs(self, scored: PromptLogprobs) -> None:
        end = scored.start + len(scored.logprobs)
        self.prompt_logprobs[scored.start : end] = scored.logprobs
        if self.prompt_top_logprobs is not None:
            self.prompt_top_logprobs[scored.start : end] = scored.top_logprobs


class RequestStream:
    """One streaming request (Engine.open_stream): an iterator of its deltas, and its id from the start. Use it in a
    `with` block: leaving the block, `close()` or `abort()` (from any thread, before its first token too) aborts it
    unless it finished, and frees its blocks. A request that fails while running raises RequestFailedError after
    its last delta; so does one the engine stops serving (closed, loop dead)."""

    def __init__(self, engine: "Engine", req: _Request) -> None:
        self._engine, self._req = engine, req
        self.request_id: int = req.seq.seq_id
        self.finished = False  # its final delta was handed out

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> StreamDelta:
        while not self.finished:
            try:
                delta = self._req.listener.get(timeout=LISTENER_POLL_S)
            except queue.Empty:
                self._engine._check_loop(self._req)
                continue
            self.finished = delta.finished
            if delta.finished and delta.finish_reason == "error":
                raise RequestFailedError(f"request {self.request_id} failed: {delta.output.error}", self.request_id)
            return delta
        raise StopIteration

    def abort(self) -> None:
        self._engine.abort(self.request_id)

    def close(self) -> None:
        """Abort the request unless its final delta was handed out (idempotent)."""
        if not self.finished:
            self.abort()

    def __enter__(self) -> "RequestStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kv_spec_for(loaded: LoadedModel, block_size: int, attention: AttentionBackend) -> KVCacheSpec:
    """The KV cache layout the model reported at load (backend/models/kv_layout.py: native options or the probe)."""
    return kv_cache_spec(loaded.model, loaded.dtype, block_size, pad_head_dims=attention.pads_head_dims)


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


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
        try:  # every kernel override of the environment, read and validated once (flab_kernels/dispatch.py)
            self.kernel_settings = KernelSettings.from_env()
        except ValueError as e:
            raise EngineError(str(e)) from None
        self.tp_group = None  # backend/distributed: the worker ranks when tp_size > 1
        with kernel_dispatch.using(self.kernel_settings):
            if cfg.tp_size > 1:
                from backend.distributed import TensorParallelGroup, TPOptions

                self.tp_group = TensorParallelGroup.start(TPOptions(cfg.tp_size), cfg.torch_device.type)
            try:
                self.loaded: LoadedModel = self._load(cfg, progress)
                self._set_up(cfg)
            except BaseException:
                if self.tp_group is not None:
                    self.tp_group.shutdown()
                raise

    def _load(self, cfg: EngineConfig, progress: Callable | None) -> LoadedModel:
        """The model, on this process or the tensor-parallel ranks. On CPU glibc maps big blocks on their own while
        it loads, then keeps freed memory for the step loop (`keep_freed_memory`, backend/host_allocator.py)."""
        tune_malloc = cfg.keep_freed_memory and cfg.torch_device.type == "cpu"
        if tune_malloc:
            map_big_blocks()
        try:
            return self.tp_group.load(cfg, progress) if self.tp_group else load_model(cfg, progress)
        finally:
            self.malloc_tuned = tune_malloc and keep_freed_memory()

    def _set_up(self, cfg: EngineConfig) -> None:
        self.tokenizer = self.loaded.tokenizer
        self.device = self.loaded.device
        self.model_impl = self.loaded.impl
        self.attention = make_attention_backend(
            cfg.attention_backend, self.device, torch.float32 if self.loaded.cpu_upcast else None
        )
        self.attention_backend = self.attention.name
        spec = kv_spec_for(self.loaded, cfg.block_size, self.attention)
        self.max_model_len, num_blocks = self._size_kv_cache(spec)
        self.kv_cache = KVCache(spec, num_blocks, self.device)
        self.allocator = BlockAllocator(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.allocator, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_running_per_owner
        )
        if self.tp_group is not None:
            from backend.distributed import DistributedRunner

            self.runner = DistributedRunner(
                self.tp_group, self.loaded.model, self.kv_cache, self.device, self.attention
            )
        else:
            self.runner = ModelRunner(self.loaded.model, self.kv_cache, self.device, self.attention)
        self.metrics = Metrics()
        self.vocab_size = self.loaded.hf_config.get_text_config().vocab_size
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        self._rng = random.Random(cfg.seed)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._loop: threading.Thread | None = None
        self._closed = False
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._finished: Counter[str] = Counter()
        self._description: dict | None = None
        self._outbox: deque[RequestOutput] = deque(maxlen=OUTBOX_SIZE)

    # --- setup ----------------------------------------------------------------------------------

    def _size_kv_cache(self, spec: KVCacheSpec) -> tuple[int, int]:
        """(max_model_len, num_blocks) by the one sizing rule (backend/kv_sizing.py), which the estimate shares."""
        cfg = self.config
        plan = plan_kv_cache(
            spec,
            model_context_len(self.loaded.hf_config),
            self.device,
            cfg.kv_cache_memory_gb,
            cfg.num_kv_blocks,
            cfg.max_model_len,
        )
        return plan.max_model_len, plan.num_blocks

    # --- requests -------------------------------------------------------------------------------

    def _encode(self, prompt) -> list[int]:
        if not isinstance(prompt, str):
            raise RequestError(f"a prompt must be a string, got {type(prompt).__name__} {prompt!r:.60}")
        if not prompt:
            raise RequestError("the prompt is empty: give a non-empty string")
        if self.tokenizer is None:
            raise RequestError("this engine was started without a tokenizer: give prompt_token_ids instead of text")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(f"the prompt is not valid Unicode (a lone surrogate at position {e.start})") from None
        return self.tokenizer.encode(prompt)

    def _check_token_ids(self, ids) -> list[int]:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
            raise RequestError(f"prompt_token_ids must be a list of integers, got {type(ids).__name__}")
        ids = list(ids)
        if not ids:
            raise RequestError("the prompt is empty (no tokens)")
        vocab = self.vocab_size
        bad = [t for t in ids if not is_int(t) or not 0 <= t < vocab]
        if bad:
            bad = bad[0]
            raise RequestError(f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad!r:.40}")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; the context holds {self.max_model_len} "
                "(prompt plus at least one new token): shorten it"
            )
        return ids

    def add_request(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        owner: str | None = None,
    ) -> int:
        """Queue a request; returns its id. Raises RequestError for bad input (nothing is queued then).
        Its outputs come back from `step()` (the finished delta carries the whole output)."""
        req = self._add(prompt, params, prompt_token_ids, None, owner)
        req.manual = True
        return req.seq.seq_id

    def take_finished(self) -> list[RequestOutput]:
        """Outputs of add_request() requests that finished in steps the background loop ran (and so were
        returned to no caller), oldest first; each is handed out once."""
        with self._lock:
            outputs = list(self._outbox)
            self._outbox.clear()
            return outputs

    def _add(self, prompt, params, prompt_token_ids, listener: queue.Queue | None, owner=None) -> _Request:
        if owner is not None and not isinstance(owner, str):
            raise RequestError(f"owner must be None or a string, got {type(owner).__name__}")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = self._check_token_ids(prompt_token_ids if prompt_token_ids is not None else self._encode(prompt))
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        generator = None if params.greedy else torch.Generator(device=self.device).manual_seed(seed)
        with self._lock:
            if self._closed:
                raise RequestError("the engine is closed")
            rid = self._next_id
            self._next_id += 1
            seq = Sequence(rid, ids, params, generator, owner=owner)
            detok = Detokenizer(self.tokenizer, params.skip_special_tokens) if self.tokenizer is not None else None
            req = _Request(seq, prompt, listener=listener, detokenizer=detok, stops=StopMatcher(params.stop))
            if params.prompt_logprobs is not None:
                req.prompt_logprobs = [None] * len(ids)
                req.prompt_top_logprobs = [None] * len(ids) if params.prompt_logprobs else None
            self._requests[rid] = req
            self.scheduler.add(seq)
            self._wake.notify_all()
        return req

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
        """Run one engine step; returns a delta for every request that advanced or finished in it."""
        with self._lock:
            involved: list[Sequence] = list(self.scheduler.running)
            try:
                return self._step(involved)
            except Exception as e:  # outside any one request: fail the step's requests, keep the engine
                logger.exception("engine step failed")
                return self._fail(involved, f"engine step failed: {_error_text(e)}")

    def _step(self, involved: list[Sequence]) -> list[StreamDelta]:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        involved[:] = batch.seqs
        if not batch.seqs:
            return []
        prefill_tokens = batch.num_prefill_tokens
        try:
            with kernel_dispatch.using(self.kernel_settings):
                out = self.runner.run(batch)
        except Exception as e:  # a failing forward fails its batch, not the engine
            logger.exception("model step failed")
            return self._fail(batch.seqs, f"model step failed: {_error_text(e)}")
        self.scheduler.update(batch)
        self._prompt_tokens += prefill_tokens
        failed: dict[int, StreamDelta] = {}  # requests that failed on their own in this step: final deltas
        for seq_id, scored in out.prompt_logprobs.items():
            req = self._requests[seq_id]
            self._guarded(failed, req.seq, req.store_prompt_logprobs, scored)
        sampled = [s for s, flag in zip(batch.seqs, batch.sample) if flag]
        self._generation_tokens += len(sampled)
        now = time.perf_counter()
        for i, seq in enumerate(sampled):
            if seq.seq_id in failed:
                continue
            if i in out.errors:
                failed.update((d.request_id, d) for d in self._fail([seq], out.errors[i]))
            else:
                self._guarded(failed, seq, self._append_token, seq, out.token_ids[i], out, i, now)
        stats = self._record(batch, prefill_tokens, len(sampled), now - t0)
        published = []
        for seq in sampled:
            if seq.seq_id not in failed:
                published.append(self._guarded(failed, seq, self._publish, self._requests[seq.seq_id], stats))
        return list(failed.values()) + [d for d in published if d is not None]

    def _guarded(self, failed: dict[int, StreamDelta], seq: Sequence, fn, *args):
        """`fn(*args)`, one request's own work; an exception fails that request alone (its final delta goes into
        `failed`, and None is returned)."""
        try:
            return fn(*args)
        except Exception as e:
            logger.warning("request %d failed: %s", seq.seq_id, _error_text(e))
            failed.update((d.request_id, d) for d in self._fail([seq], _error_text(e)))
            return None

    def _fail(self, seqs: list[Sequence], message: str) -> list[StreamDelta]:
        """Fail these requests (freeing their blocks; one that finished but whose output could not be handed over
        ends as an error too); never raises, so a broken step cannot wedge them."""
        deltas = []
        for seq in list(seqs):
            req = self._requests.get(seq.seq_id)
            if req is None:
                continue
            seq.error = seq.error or message
            try:
                if seq.is_finished:
                    seq.finish_reason = "error"
                else:
                    self.scheduler.finish(seq, "error")
                deltas.append(self._publish(req, None))
            except Exception:  # last resort: drop it and wake its waiters
                logger.exception("could not fail request %d cleanly", seq.seq_id)
                self._requests.pop(seq.seq_id, None)
                req.final = req.final or self._output(req)
                req.done.set()
                if req.listener is not None:
                    req.listener.put(StreamDelta(seq.seq_id, "", [], True, "error", req.final))
        return deltas

    def _append_token(self, seq: Sequence, token: int, out, row: int, now: float) -> None:
        seq.output_token_ids.append(token)
        if out.logprobs is not None and seq.params.logprobs is not None:
            seq.output_logprobs.append(out.logprobs[row])
            seq.output_top_logprobs.append(out.top_logprobs[row])
        if seq.first_token_time is None:
            seq.first_token_time = now
        p = seq.params
        req = self._requests[seq.seq_id]
        if req.detokenizer is not None:
            seq.text = req.detokenizer.add(seq.output_token_ids)
        reason = None
        if (token in self.loaded.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif req.stops.found(seq.text):
            reason = "stop"
        if reason is None and (len(seq.output_token_ids) >= p.max_new_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if req.detokenizer is not None:
                text = req.detokenizer.finish(seq.output_token_ids)  # exact: one full decode
                cut = req.stops.first(text)
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
        """Build the delta since the last publish and hand it to the request's listener. A finished request
        is dropped from the engine here: its final output travels in the delta."""
        seq = req.seq
        finished = seq.is_finished
        text = seq.text
        if not finished:  # hold back what may be a partial stop string or a partial character
            end = len(text) - req.stops.hold
            while end > req.emitted_text and text[end - 1] == "\ufffd":
                end -= 1
            text = text[: max(end, req.emitted_text)]
        output = self._output(req, text)
        delta = StreamDelta(
            seq.seq_id,
            text[req.emitted_text :],
            seq.output_token_ids[req.emitted_tokens :],
            finished,
            seq.finish_reason,
            output,
            stats,
        )
        req.emitted_text, req.emitted_tokens = len(text), len(seq.output_token_ids)
        if finished:
            req.final = output
            self._finished[seq.finish_reason] += 1
            self._requests.pop(seq.seq_id, None)
            if req.manual and threading.current_thread() is self._loop:
                self._outbox.append(output)  # nobody called this step: keep it for take_finished()
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
        owner: str | None = None,
    ) -> list[RequestOutput]:
        """Run the prompts to the end; outputs in prompt order. A bad prompt raises RequestError before any
        runs; a request that fails while running raises RequestFailedError (the others still finish)."""
        items = self._items(prompts, prompt_token_ids)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(items)
        if len(params) != len(items):
            raise RequestError("sampling_params must be one SamplingParams or one per prompt")
        reqs: list[_Request] = []
        try:
            for (prompt, token_ids), p in zip(items, params):
                reqs.append(self._add(prompt, p, token_ids, None, owner))
        except BaseException:
            for r in reqs:  # a bad prompt in the list: queue nothing
                self.abort(r.seq.seq_id)
            raise
        try:
            if self._loop is not None and self._loop.is_alive():
                for r in reqs:
                    self._wait(r)
            else:
                while not all(r.seq.is_finished for r in reqs):
                    self.step()
        except BaseException:
            for r in reqs:
                self.abort(r.seq.seq_id)
            raise
        outputs = [r.final for r in reqs]
        failed = [o for o in outputs if o.finish_reason == "error"]
        if failed:
            raise RequestFailedError(
                f"{len(failed)} of {len(outputs)} requests failed; request {failed[0].request_id}: {failed[0].error}",
                failed[0].request_id,
            )
        return outputs

    @staticmethod
    def _items(prompts, prompt_token_ids) -> list[tuple[str | None, list[int] | None]]:
        if prompts is not None and prompt_token_ids is not None:
            raise RequestError("give prompts or prompt_token_ids, not both")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if not isinstance(prompts, (list, tuple)):
                raise RequestError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
            items = [(p, None) for p in prompts]
        elif prompt_token_ids is not None:
            if not isinstance(prompt_token_ids, (list, tuple)) or not all(
                isinstance(ids, (list, tuple)) for ids in prompt_token_ids
            ):
                raise RequestError("prompt_token_ids must be a list of token id lists, e.g. [[1, 2, 3]]")
            items = [(None, ids) for ids in prompt_token_ids]
        else:
            items = []
        if not items:
            raise RequestError("give prompts or prompt_token_ids")
        return items

    def _wait(self, req: _Request) -> None:
        while not req.done.wait(LISTENER_POLL_S):
            self._check_loop(req)

    def _check_loop(self, req: _Request) -> None:
        if req.seq.is_finished:
            return
        if self._closed or self._loop is None or not self._loop.is_alive():
            raise RequestFailedError("the engine stopped before this request finished", req.seq.seq_id)

    def open_stream(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        owner: str | None = None,
    ) -> "RequestStream":
        """Queue a request now and return its handle: `request_id` at once (another thread may `abort` it before
        its first token, e.g. a client that hung up while it waited), its deltas by iterating. Raises RequestError
        for bad input (nothing is queued then)."""
        self.start_background_loop()
        return RequestStream(self, self._add(prompt, params, prompt_token_ids, queue.Queue(), owner))

    def stream(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        owner: str | None = None,
    ) -> Iterator[StreamDelta]:
        """Yield deltas as tokens are produced. Leaving the loop early aborts the request. A request that
        fails while running raises RequestFailedError after its last delta."""
        with self.open_stream(prompt, params, prompt_token_ids, owner) as handle:
            yield from handle

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
            try:
                self.step()  # fails the step's requests itself; this guard keeps the loop for the rest
            except Exception:  # pragma: no cover - step() handles its own failures
                logger.exception("engine loop: step raised")
            time.sleep(0)  # let callers take the lock between steps

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._description = self._describe()
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

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- read-outs ------------------------------------------------------------------------------

    @property
    def weights_bytes(self) -> int:
        if not hasattr(self, "_weights_bytes"):
            self._weights_bytes = self.loaded.weights_bytes
        return self._weights_bytes

    @property
    def model(self):
        """The module tree that runs (native or the wrapped transformers model), for inspection: read, don't
        change it while the engine serves."""
        return self.loaded.model

    @property
    def decode_weight_bytes(self) -> int:
        """Bytes of weights one batch-1 decode step reads (for bandwidth figures)."""
        return self.loaded.decode_weight_bytes

    @property
    def num_requests(self) -> int:
        """Requests the engine holds (queued or running); finished ones are dropped."""
        with self._lock:
            return len(self._requests)

    def stats(self) -> EngineStats:
        """A consistent snapshot of queues, KV blocks and cumulative counters."""
        with self._lock:
            alloc = self.allocator
            return EngineStats(
                num_running=len(self.scheduler.running),
                num_waiting=len(self.scheduler.waiting),
                kv_blocks_total=alloc.num_blocks,
                kv_blocks_used=alloc.num_used,
                kv_blocks_cached=alloc.num_cached_free,
                block_size=alloc.block_size,
                max_model_len=self.max_model_len,
                prompt_tokens=self._prompt_tokens,
                generation_tokens=self._generation_tokens,
                prefix_queried_blocks=alloc.prefix_queries,
                prefix_hit_blocks=alloc.prefix_hits,
                num_preemptions=self.scheduler.num_preemptions,
                num_steps=self.metrics.total_steps,
                finished=dict(self._finished),
                started_at=self.metrics.start,
                last_step=self.metrics.last(),
            )

    def step_history(self, since_step: int = -1) -> list[StepStats]:
        """The recent steps (bounded history) after step number `since_step`."""
        return self.metrics.history(since_step)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. between benchmark runs); running requests are not affected."""
        with self._lock:
            self.allocator.reset_prefix_cache()

    def kv_cache_view(self) -> list[KVBlock]:
        """One entry per KV block: owners (request ids), reference count, whether it holds a cached prefix."""
        with self._lock:
            owners: list[list[int]] = [[] for _ in range(self.allocator.num_blocks)]
            for seq in self.scheduler.running:
                for b in seq.block_table:
                    owners[b].append(seq.seq_id)
            return [
                KVBlock(b, owners[b], self.allocator.ref_count[b], self.allocator.block_hash[b] is not None)
                for b in range(self.allocator.num_blocks)
            ]

    def describe(self) -> dict:
        """What runs: implementation, injected/swapped modules, model shape, cache geometry (for UI and notebook).
        Still answers after close() (as it was when the engine closed)."""
        with self._lock:
            return dict(self._description) if self._description is not None else self._describe()

    def _describe(self) -> dict:
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
            attention_compute_dtype=str(self.attention.compute_dtype or self.loaded.dtype).removeprefix("torch."),
            malloc_keeps_freed_memory=self.malloc_tuned,
            cpu_linear=self.loaded.cpu_linear,
            cpu_linears=self.loaded.num_cpu_linears,
            cpu_kernels=self.loaded.cpu_kernels,
            cpu_kernels_reason=self.loaded.cpu_kernels_reason,
            decode_weight_bytes=self.decode_weight_bytes,
            weights_bytes=self.weights_bytes,
            kv_cache=dict(
                num_blocks=self.kv_cache.num_blocks,
                block_size=spec.block_size,
                bytes=self.kv_cache.nbytes,
                max_model_len=self.max_model_len,
                **spec.describe(),  # layers, slots, bytes per token, heads and head sizes (per slot when they differ)
            ),
        )
        layout = self.runner.describe()  # a tensor-parallel runner: per rank its device, weight and KV bytes, heads
        if layout is not None:
            info["tensor_parallel"] = layout
        return info

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        """The KV cache layout (per-slot heads and head sizes, block size, bytes per token and per block)."""
        return self.kv_cache.spec

    def trace_step(self, prompt_token_ids: list[list[int]]) -> list:
        """One traced step: what our attention function received per layer and call (q/k/v shapes, kwargs such
        as sliding_window / softcap / s_aux) and how many sequences prefilled and decoded (backend/models/trace.py:
        all prompts but the last decode, the last prefills)."""
        from backend.models.trace import trace_attention_calls

        return trace_attention_calls(self, prompt_token_ids)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """The logits (L, V) of every position of one prompt, from one uncached prefill (checks against HF,
        lessons). Needs ceil(L / block_size) free KV blocks for the moment it runs."""
        ids = self._check_token_ids(token_ids)
        seq = Sequence(-1, ids, SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=0))
        with self._lock:
            if self._closed:
                raise RequestError("the engine is closed")
            seq.block_table = self.allocator.allocate(-(-len(ids) // self.allocator.block_size))
            try:
                with kernel_dispatch.using(self.kernel_settings):
                    return self.runner.logits(ScheduledBatch([seq], [len(ids)], [True])).float()
            finally:
                self.allocator.free(seq.block_table)

    def check_invariants(self) -> None:
        """Raise AssertionError if the KV block accounting disagrees with the requests' block tables."""
        with self._lock:
            self.allocator.check_invariants(
                [s.block_table for s in self.scheduler.running + list(self.scheduler.waiting)]
            )
