"""Engine: the public API. add_request / step / generate / stream / open_stream / abort / close, and the read-outs
(stats, step_history, kv_cache_view, describe, reset_prefix_cache) that the app, the server, the benchmarks and
the notebook use. Nothing outside backend/ reads the engine's parts. The work is delegated: input checks
(validation.py), the request registry and output processing (requests.py), read-outs (readouts.py).

One step is: drain the inbox -> schedule -> run -> update and publish. Callers never wait for a forward:
`add_request`, `abort` and `reset_prefix_cache` are messages (messages.py) applied at once when no step is in
progress, else at the end of the step in progress; the state lock is held for that bookkeeping only, never
across the model forward. Between steps the loop publishes an immutable `StateSnapshot` (readouts.py), which
`stats()`, `kv_cache_view()` and `num_requests` read without any lock; then it pushes each request's deltas to
its consumer (a RequestStream's queue, or a sink such as the server's
asyncio bridge). A background thread runs steps while several callers stream at once (UI, server); without
it, `generate` drives the steps itself, and `step()` stays for callers who drive the engine themselves.

Failures stay with the request they belong to: a request whose sampling, stop handling or output fails is
finished with finish_reason "error" (and `error` set) while the rest of its batch goes on; a model forward
that raises fails the requests of that batch; any other exception in a step fails the requests of that step
and the engine keeps serving. `generate()` and `stream()` raise `RequestFailedError` for such a request;
`step()` callers see finish_reason "error" with the error text on the finished delta.

`owner` (a visitor, an API key) makes scheduling fair across owners (backend/core/scheduler.py).

A finished request's state is dropped once its final output is handed over: `generate()` returns it,
`stream()` yields it, and `step()` returns it as the finished delta (take it from there). A request added with
`add_request()` that finishes in a step run by the background loop (started by a `stream()` caller) waits in
a bounded outbox until `take_finished()` collects it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import torch

from backend.core.config import EngineConfig
from backend.core.detokenizer import Detokenizer
from backend.core.errors import RequestError, RequestFailedError
from backend.core.kv_cache import KVCacheSpec
from backend.core.messages import AbortRequest, AddRequest, Message, ResetPrefixCache
from backend.core.metrics import EngineStats, KVBlock, Metrics, StepStats
from backend.core.outputs import RequestOutput, StreamDelta
from backend.core.parts import build_parts
from backend.core.readouts import StateSnapshot, describe_engine, engine_stats, kv_blocks, step_stats, take_snapshot
from backend.core.requests import Request, RequestBook, Sink, error_text
from backend.core.sampling import SamplingParams
from backend.core.scheduler import ScheduledBatch
from backend.core.sequence import Sequence, prefix_salt
from backend.core.stop import StopMatcher
from backend.core.streams import LISTENER_POLL_S, RequestStream
from backend.core.validation import (
    check_cache_salt,
    check_owner,
    check_params,
    check_prompt_text,
    check_token_ids,
    encode_prompt,
    prompt_items,
)
from backend.loading.build import LoadedModel
from backend.multimodal import prepare_image_request
from backend.multimodal.chat import ChatPrompt, chat_prompt
from flab_kernels import dispatch as kernel_dispatch

logger = logging.getLogger(__name__)

BatchHook = Callable[[ScheduledBatch], None]


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
        *,
        tp_group=None,
        own_tp_group: bool = False,
        **engine_options,
    ) -> None:
        """`tp_group`: a running backend.distributed TensorParallelGroup to load onto (backend/distributed/testing.py),
        which close() only unloads unless `own_tp_group`; without it, `tp_size` > 1 starts a group of the engine's
        own."""
        self.config = EngineConfig.from_kwargs(
            model,
            model_impl=model_impl,
            quantization=quantization,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            **engine_options,
        )
        parts = build_parts(self.config, progress, tp_group, own_tp_group)  # backend/core/parts.py
        self.kernel_settings = parts.kernel_settings
        self.tp_group = parts.tp_group  # backend/distributed: the worker ranks when tp_size > 1
        self.loaded: LoadedModel = parts.loaded
        self.malloc_tuned = parts.malloc_tuned
        self.attention = parts.attention
        self.kv_cache, self.allocator, self.scheduler = parts.kv_cache, parts.allocator, parts.scheduler
        self.runner = parts.runner
        self.max_model_len = parts.max_model_len
        self.tokenizer = self.loaded.tokenizer
        self.device = self.loaded.device
        self.model_impl = self.loaded.impl
        self.attention_backend = self.attention.name
        self.vocab_size = self.loaded.hf_config.get_text_config().vocab_size
        self.metrics = Metrics()
        self._book = RequestBook(self.scheduler, self.loaded.eos_token_ids, self.max_model_len)
        self._next_id = 0
        self._rng = random.Random(self.config.seed)
        # _state guards the scheduler, the allocator and the book; held for bookkeeping only, never across a forward
        self._state = threading.RLock()
        self._wake = threading.Condition(self._state)  # the loop waits here for work
        self._step_lock = threading.RLock()  # one step at a time (the loop, step() callers, prompt_logits)
        self._inbox: deque[Message] = deque()
        self._busy = False  # a step owns the state (its batch is scheduled): messages wait in the inbox
        self._loop: threading.Thread | None = None
        self._stopping = False  # close() began: the loop starts no more steps
        self._closed = False
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._queued_adds = 0  # AddRequest messages in the inbox
        self._description: dict | None = None
        self._snapshot: StateSnapshot = self._take_snapshot()

    # --- requests: messages to the loop ---------------------------------------------------------

    def _post(self, message: Message) -> None:
        with self._state:
            self._inbox.append(message)
            adds = isinstance(message, AddRequest)
            self._queued_adds += adds
            if not self._busy:
                self._drain()
                self._publish_state()
            elif adds:  # a step is in flight: the read-outs count it as waiting until the step's end applies it
                self._snapshot = self._snapshot.with_queued(1)
            self._wake.notify_all()

    def _drain(self) -> bool:
        """Apply the inbox's messages in order (the caller holds the state lock and no step is in flight); whether
        there were any."""
        applied = bool(self._inbox)
        while self._inbox:
            message = self._inbox.popleft()
            self._queued_adds -= isinstance(message, AddRequest)
            message.apply(self._book)
        return applied

    def _take_snapshot(self) -> StateSnapshot:
        return take_snapshot(
            self.scheduler,
            self.metrics,
            len(self._book),
            self._queued_adds,
            self._prompt_tokens,
            self._generation_tokens,
            self._book.finished,
        )

    def _publish_state(self) -> None:
        """Between steps (the caller holds the state lock): swap in the snapshot the read-outs show, then push the
        deltas published since the last time to their consumers (who then see a state that matches them)."""
        self._snapshot = self._take_snapshot()
        if self._book.deliver():  # a consumer failed: its request finished meanwhile
            self._snapshot = self._take_snapshot()

    def _new_request(
        self,
        prompt,
        params,
        prompt_token_ids,
        sink: Sink | None,
        owner=None,
        manual: bool = False,
        cache_salt=None,
        images=None,
    ) -> Request:
        """Check the input (RequestError: nothing is queued) and queue the request."""
        owner = check_owner(owner)
        cache_salt = check_cache_salt(cache_salt)
        params = check_params(params)
        image_inputs = None
        if images is not None:  # an image-text request: the processor expands the placeholders (backend/multimodal)
            if prompt_token_ids is not None:
                raise RequestError("images go with a text prompt, not with prompt_token_ids", param="images")
            if self.tp_group is not None:
                raise RequestError(
                    "images: a tensor-parallel engine (tp_size > 1) takes no images yet; send text only", param="images"
                )
            prompt_token_ids, image_inputs = prepare_image_request(
                self.loaded.model, self.loaded.processor, prompt, images
            )
        elif prompt_token_ids is None:
            prompt_token_ids = encode_prompt(self.tokenizer, prompt)
        ids = check_token_ids(prompt_token_ids, self.vocab_size, self.max_model_len)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        generator = None if params.greedy else torch.Generator(device=self.device).manual_seed(seed)
        detok = Detokenizer(self.tokenizer, params.skip_special_tokens) if self.tokenizer is not None else None
        with self._state:
            if self._stopping:
                raise RequestError("the engine is closed")
            rid = self._next_id
            self._next_id += 1
            salt = prefix_salt(
                owner if self.config.prefix_cache_per_owner else None,  # hosted: one visitor's blocks are its own
                cache_salt,
                None if image_inputs is None else image_inputs.content_hash,  # another image shares no block
            )
            seq = Sequence(rid, ids, params, generator, owner=owner, prefix_salt=salt, images=image_inputs)
            req = Request(seq, prompt, sink=sink, detokenizer=detok, stops=StopMatcher(params.stop), manual=manual)
            if params.prompt_logprobs is not None:
                req.prompt_logprobs = [None] * len(ids)
                req.prompt_top_logprobs = [None] * len(ids) if params.prompt_logprobs else None
            self._post(AddRequest(req))
        return req

    def check_prompt_text(self, prompt) -> None:
        """What add_request checks of a text prompt before tokenizing it (a non-empty string of valid Unicode, a
        tokenizer to read it); raises RequestError. The server calls it for request bodies."""
        check_prompt_text(self.tokenizer, prompt)

    def check_prompt_ids(self, ids) -> list[int]:
        """Prompt token ids as add_request takes them (a non-empty list of ids of the vocabulary, with room for one
        new token: ContextLengthError otherwise); raises RequestError. The server calls it for request bodies."""
        return check_token_ids(ids, self.vocab_size, self.max_model_len)

    def add_request(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        owner: str | None = None,
        cache_salt: str | None = None,
        images: object | None = None,
    ) -> int:
        """Queue a request; returns its id. Raises RequestError for bad input (nothing is queued then).
        Its outputs come back from `step()` (the finished delta carries the whole output). `cache_salt` (as
        vLLM's; also on generate / stream / open_stream) enters the hash of the prompt's first KV block: requests
        share prefix-cache blocks only with requests of the same salt (None, the default: shared by all). `images`
        (also on generate / stream / open_stream): an image or a list of images (PIL, path, bytes) whose
        placeholders the prompt holds (an image-text model)."""
        req = self._new_request(
            prompt, params, prompt_token_ids, None, owner, manual=True, cache_salt=cache_salt, images=images
        )
        return req.seq.seq_id

    def abort(self, request_id: int) -> None:
        """Cancel a request; returns at once. Its KV blocks are freed at once between steps, else as the step in
        progress ends (its final delta, finish_reason "abort", goes to its stream)."""
        self._post(AbortRequest(request_id))

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. between benchmark runs); running requests are not affected."""
        self._post(ResetPrefixCache())

    def take_finished(self) -> list[RequestOutput]:
        """Outputs of add_request() requests that finished in steps the background loop ran (and so were
        returned to no caller), oldest first; each is handed out once."""
        with self._state:
            outputs = list(self._book.outbox)
            self._book.outbox.clear()
            return outputs

    # --- the step -------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        with self._state:
            return self.scheduler.has_work() or self._queued_adds > 0

    def step(self, on_batch: BatchHook | None = None) -> list[StreamDelta]:
        """Run one engine step; returns a delta for every request that advanced or finished in it. `on_batch`
        (tracing, backend/models/trace.py) sees the scheduled batch before its forward."""
        return self._step_once(to_outbox=False, on_batch=on_batch)

    @contextlib.contextmanager
    def exclusive_steps(self) -> Iterator[None]:
        """Inside the block only this thread steps (the background loop waits): several step() calls in a row
        that nothing else interleaves with (trace_step)."""
        with self._step_lock:
            yield

    def _step_once(self, to_outbox: bool, on_batch: BatchHook | None = None) -> list[StreamDelta]:
        with self._step_lock, self._state:
            if self._drain():
                self._publish_state()
            self._busy = True
            involved: list[Sequence] = list(self.scheduler.running)
            try:
                return self._step(involved, to_outbox, on_batch)
            except Exception as e:  # outside any one request: fail the step's requests, keep the engine
                logger.exception("engine step failed")
                return self._book.fail(involved, f"engine step failed: {error_text(e)}", to_outbox)
            finally:
                self._busy = False
                self._drain()  # what callers asked during the step
                self._publish_state()

    def _step(self, involved: list[Sequence], to_outbox: bool, on_batch: BatchHook | None) -> list[StreamDelta]:
        """Under the state lock, which it lets go for the forward only."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        involved[:] = batch.seqs
        if not batch.seqs:
            return []
        if on_batch is not None:
            on_batch(batch)
        prefill_tokens = batch.num_prefill_tokens
        try:
            self._state.release()  # the forward: callers add, abort and read meanwhile
            try:
                with kernel_dispatch.using(self.kernel_settings):
                    out = self.runner.run(batch)
            finally:
                self._state.acquire()
        except Exception as e:  # a failing forward fails its batch, not the engine
            logger.exception("model step failed")
            return self._book.fail(batch.seqs, f"model step failed: {error_text(e)}", to_outbox)
        book = self._book
        self.scheduler.update(batch)
        self._prompt_tokens += prefill_tokens
        failed: dict[int, StreamDelta] = {}  # requests that failed on their own in this step: final deltas
        for seq_id, scored in out.prompt_logprobs.items():
            req = book.requests[seq_id]
            book.guarded(failed, req.seq, to_outbox, req.store_prompt_logprobs, scored)
        sampled = [s for s, flag in zip(batch.seqs, batch.sample) if flag]
        self._generation_tokens += len(sampled)
        now = time.perf_counter()
        for i, seq in enumerate(sampled):
            if seq.seq_id in failed:
                continue
            if i in out.errors:
                failed.update((d.request_id, d) for d in book.fail([seq], out.errors[i], to_outbox))
            else:
                book.guarded(failed, seq, to_outbox, book.append_token, seq, out.token_ids[i], out, i, now)
        stats = step_stats(
            batch,
            self.scheduler,
            self.kv_cache,
            self.metrics,
            self.weights_bytes,
            self.device,
            prefill_tokens,
            len(sampled),
            now - t0,
            out.vision_s,
        )
        published = []
        for seq in sampled:
            if seq.seq_id not in failed:
                req = book.requests[seq.seq_id]
                published.append(book.guarded(failed, seq, to_outbox, book.publish, req, stats, to_outbox))
        return list(failed.values()) + [d for d in published if d is not None]

    # --- high-level API -------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | list[str] | None = None,
        sampling_params: SamplingParams | list | None = None,
        prompt_token_ids: list[list[int]] | None = None,
        owner: str | None = None,
        cache_salt: str | None = None,
        images: list | None = None,
    ) -> list[RequestOutput]:
        """Run the prompts to the end; outputs in prompt order. A bad prompt raises RequestError before any
        runs; a request that fails while running raises RequestFailedError (the others still finish)."""
        items = prompt_items(prompts, prompt_token_ids)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(items)
        if len(params) != len(items):
            raise RequestError("sampling_params must be one SamplingParams or one per prompt", param="sampling_params")
        if images is not None and (not isinstance(images, (list, tuple)) or len(images) != len(items)):
            raise RequestError(
                "images must be a list with one entry per prompt (None, an image or a list of images)", param="images"
            )
        per_prompt = list(images) if images is not None else [None] * len(items)
        reqs: list[Request] = []
        try:
            for (prompt, token_ids), p, imgs in zip(items, params, per_prompt):
                reqs.append(self._new_request(prompt, p, token_ids, None, owner, cache_salt=cache_salt, images=imgs))
        except BaseException:
            for r in reqs:  # a bad prompt in the list: queue nothing
                self.abort(r.seq.seq_id)
            raise
        try:
            if self._loop is not None and self._loop.is_alive():
                for r in reqs:
                    while not r.done.wait(LISTENER_POLL_S):
                        self.check_serving(r)
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

    def open_stream(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        owner: str | None = None,
        sink: Sink | None = None,
        cache_salt: str | None = None,
        images: object | None = None,
    ) -> RequestStream:
        """Queue a request now and return its handle: `request_id` at once (another thread may `abort` it before
        its first token, e.g. a client that hung up while it waited), its deltas by iterating. Raises RequestError
        for bad input (nothing is queued then). `sink`: each delta is pushed to it instead (called on the engine's
        thread, it must not block; the server's asyncio bridge), and the handle is for its id and abort only."""
        self.start_background_loop()
        deltas = None if sink is not None else queue.SimpleQueue()
        req = self._new_request(
            prompt, params, prompt_token_ids, sink or deltas.put, owner, cache_salt=cache_salt, images=images
        )
        return RequestStream(self, req, deltas)

    def stream(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        owner: str | None = None,
        cache_salt: str | None = None,
        images: object | None = None,
    ) -> Iterator[StreamDelta]:
        """Yield deltas as tokens are produced. Leaving the loop early aborts the request. A request that
        fails while running raises RequestFailedError after its last delta."""
        with self.open_stream(prompt, params, prompt_token_ids, owner, cache_salt=cache_salt, images=images) as handle:
            yield from handle

    def chat_prompt(
        self, messages, chat_template: str | None = None, add_generation_prompt: bool = True, **template_kwargs
    ) -> ChatPrompt:
        """OpenAI-style chat messages (text and image parts: a PIL image, path, bytes or data: URL) through the chat
        template, the processor's for an image-text model (backend/multimodal/chat.py, the server's path too):
        `engine.stream(**p.request_kwargs(), params=...)`. RequestError naming the field for bad input."""
        return chat_prompt(
            self.tokenizer, self.processor, messages, chat_template, add_generation_prompt, template_kwargs
        )

    def chat(self, messages, params: SamplingParams | None = None, owner=None, cache_salt=None) -> RequestOutput:
        """Run chat messages (see chat_prompt) to the end; the output of generate()."""
        p = self.chat_prompt(messages)
        if p.images:
            return self.generate([p.text], params, None, owner, cache_salt, [p.images])[0]
        return self.generate(None, params, [p.token_ids], owner, cache_salt)[0]

    # --- the background loop --------------------------------------------------------------------

    def start_background_loop(self) -> None:
        with self._state:
            if self._stopping:
                raise RequestError("the engine is closed")
            if self._loop is None or not self._loop.is_alive():
                self._loop = threading.Thread(target=self._run_loop, name="engine-loop", daemon=True)
                self._loop.start()

    def _run_loop(self) -> None:
        while True:
            with self._state:
                while not self._stopping and not self.scheduler.has_work():
                    self._wake.wait(timeout=1.0)
                if self._stopping:
                    return
            try:
                self._step_once(to_outbox=True)  # fails the step's requests itself; this guard keeps the loop
            except Exception:  # pragma: no cover - the step handles its own failures
                logger.exception("engine loop: step raised")
            time.sleep(0)  # let a thread waiting for the step lock (close, prompt_logits, a trace) take it

    def _loop_alive(self) -> bool:
        return self._loop is not None and self._loop.is_alive()

    def check_serving(self, req: Request) -> None:
        """Raise RequestFailedError when the engine stopped serving this unfinished request (closed, loop dead)."""
        if req.seq.is_finished:
            return
        if self._closed or not self._loop_alive():
            raise RequestFailedError("the engine stopped before this request finished", req.seq.seq_id)

    def wait_done(self, req: Request) -> None:
        """Wait until the request was dropped (its final delta published), or the engine stopped serving it."""
        while not req.done.wait(LISTENER_POLL_S):
            if self._closed or not self._loop_alive():
                return

    def close(self) -> None:
        with self._state:
            if self._stopping:
                return
            self._stopping = True
            self._wake.notify_all()
        with self._step_lock, self._state:  # after the step in progress
            self._description = self._describe()
            self._closed = True
            self._drain()
            for req in list(self._book.requests.values()):
                self._book.abort(req.seq.seq_id)
            self._publish_state()
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
    def processor(self):
        """An image-text model's processor (AutoProcessor); None for a language model, or where it cannot load here
        (describe()["images"] says why)."""
        return self.loaded.processor.processor if self.loaded.processor is not None else None

    @property
    def decode_weight_bytes(self) -> int:
        """Bytes of weights one batch-1 decode step reads (for bandwidth figures)."""
        return self.loaded.decode_weight_bytes

    @property
    def num_requests(self) -> int:
        """Requests the engine holds (queued or running); finished ones are dropped. From the latest snapshot."""
        snap = self._snapshot
        return snap.num_held + snap.queued

    def stats(self) -> EngineStats:
        """Queues, KV blocks and cumulative counters as they were at the end of the last step (or the last request
        added or aborted between steps): the snapshot the loop published; takes no lock."""
        return engine_stats(self._snapshot, self.allocator, self.metrics, self.max_model_len)

    def step_history(self, since_step: int = -1) -> list[StepStats]:
        """The recent steps (bounded history) after step number `since_step`."""
        return self.metrics.history(since_step)

    def kv_cache_view(self) -> list[KVBlock]:
        """One entry per KV block: owners (request ids), reference count, whether it holds a cached prefix."""
        return kv_blocks(self._snapshot)

    def describe(self) -> dict:
        """What runs: implementation, injected/swapped modules, model shape, cache geometry (for UI and notebook).
        Still answers after close() (as it was when the engine closed)."""
        with self._state:
            return dict(self._description) if self._description is not None else self._describe()

    def _describe(self) -> dict:
        return describe_engine(self)

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
        ids = check_token_ids(token_ids, self.vocab_size, self.max_model_len)
        seq = Sequence(-1, ids, SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=0))
        with self._step_lock:
            with self._state:
                if self._stopping:
                    raise RequestError("the engine is closed")
                seq.block_table = self.allocator.allocate(-(-len(ids) // self.allocator.block_size))
            try:
                with kernel_dispatch.using(self.kernel_settings):
                    return self.runner.logits(ScheduledBatch([seq], [len(ids)], [True])).float()
            finally:
                with self._state:
                    self.allocator.free(seq.block_table)

    def check_invariants(self) -> None:
        """Raise AssertionError if the KV block accounting disagrees with the requests' block tables."""
        with self._state:
            self.allocator.check_invariants(
                [s.block_table for s in self.scheduler.running + list(self.scheduler.waiting)]
            )
