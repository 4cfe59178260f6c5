"""Run several prompts at once on an engine (`Workload`): each request opened with `Engine.open_stream(sink=...)`,
so the engine's loop pushes its deltas into this object (as the server's bridge does, backend/server/bridge.py): no
thread per request, and one thread in all only for staggered arrivals.

The engine's background loop batches them (continuous batching); this object only collects what each
request's deltas say and the engine's per-step stats, so the UI can poll a snapshot a few times per second.
`StreamRuns` is ui/endpoint.py's EndpointWorkload's base: an HTTP stream needs a reader, one thread per request.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from functools import partial

from ui.images import image_requests
from ui.plots import Series, series_from_stats
from ui.summary import RequestResult


def build_prompt_ids(tokenizer, prompt: str, use_chat_template: bool) -> list[int] | None:
    """Token ids of the prompt with the chat template applied, or None when it does not apply."""
    if not use_chat_template or not getattr(tokenizer, "chat_template", None):
        return None
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(ids, "keys"):  # a BatchEncoding
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(t) for t in ids]


def split_prompts(prompt: str, mode: str, copies: int) -> list[str]:
    """'copies': the prompt `copies` times; 'lines': one prompt per non-empty line."""
    if mode == "lines":
        return [line.strip() for line in (prompt or "").splitlines() if line.strip()]
    return [prompt] * max(1, int(copies)) if (prompt or "").strip() else []


class StreamRuns(ABC):
    """ui/endpoint.py's EndpointWorkload's runs (an HTTP stream needs a reader): one consumer thread per request,
    staggered arrivals (request i waits i * `gap_s` seconds), Stop that aborts every request already sent, also one
    still waiting for its first token, and the run's timing. A subclass sets `results`, `cancel` and
    `gap_s`, calls `_init_runs()`, and says how a request is opened (`_open(i)` -> a stream handle: `request_id`,
    iteration, `abort()` from any thread, `close()`) and what a delta changes (`_take(i, delta)`, under the lock)."""

    results: list[RequestResult]
    cancel: threading.Event
    gap_s: float

    def _init_runs(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._handles: list = []  # the stream handles of the requests sent (stop() aborts them)
        self.start_time = 0.0
        self.end_time: float | None = None

    @abstractmethod
    def _open(self, i: int):
        """Send request i; its stream handle."""

    @abstractmethod
    def _take(self, i: int, delta) -> None:
        """Record what `delta` of request i says (called under the lock)."""

    def _launch(self, name: str) -> None:
        """One consumer thread per request (set `start_time` first)."""
        for i in range(len(self.results)):
            t = threading.Thread(target=self._consume, args=(i,), name=f"{name}-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def _consume(self, i: int) -> None:
        res = self.results[i]
        if self.gap_s and self.cancel.wait(i * self.gap_s):  # stopped before this request arrived
            with self._lock:
                res.finish_reason = "abort"
                self.end_time = time.perf_counter()
            return
        handle = None
        try:
            handle = self._open(i)
            with self._lock:  # stop() now aborts it, or it sees the flag set before
                res.request_id = handle.request_id
                self._handles.append(handle)
                cancelled = self.cancel.is_set()
            if cancelled:
                handle.abort()
            for delta in handle:
                with self._lock:
                    self._take(i, delta)
                if self.cancel.is_set() and not delta.finished:
                    break
            if self.cancel.is_set() and res.finish_reason is None:
                res.finish_reason = "abort"
        except Exception as e:  # a bad request (too long, closed engine, an endpoint error) fails only this row
            with self._lock:
                res.error = f"{type(e).__name__}: {e}"
        finally:
            if handle is not None:
                handle.close()  # leaving early aborts the request (its blocks freed, its connection closed)
            with self._lock:
                self.end_time = time.perf_counter()  # the last thread to finish sets it last

    def stop(self) -> None:
        """Cancel: abort every request sent so far (before its first token too); later ones are not sent."""
        self.cancel.set()
        with self._lock:
            handles = list(self._handles)
        for handle in handles:
            handle.abort()

    @property
    def done(self) -> bool:
        return all(not t.is_alive() for t in self._threads)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.perf_counter() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.perf_counter()))
        return self.done

    @property
    def wall_s(self) -> float:
        end = self.end_time if self.done and self.end_time is not None else time.perf_counter()
        return end - self.start_time


class Workload:
    """One run of prompts on our engine, its deltas pushed by the engine's loop (`open_stream(sink=...)`).

    start / stop / wait / done / wall_s / snapshot as ui/lab/follow.py follows them. Stop aborts every request
    already sent (also one still waiting for its first token; its final "abort" delta arrives like any other), and
    a request not sent yet is never sent."""

    def __init__(
        self,
        engine,
        prompts: list[str],
        params,
        use_chat_template: bool = True,
        cancel: threading.Event | None = None,
        gap_s: float = 0.0,
        owner: str | None = None,
        image=None,
    ) -> None:
        """`gap_s`: request i arrives i * gap_s seconds after the start (staggered arrivals). `owner`: who runs it
        (the browser session): the engine schedules fairly across owners. `image`: one image (checked, PIL) that
        every request carries, for an image-text model (ui/images.py)."""
        self.engine = engine
        self.owner = owner
        self.params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        self.cancel = cancel or threading.Event()
        self.gap_s = max(0.0, float(gap_s or 0.0))
        self.results = [
            RequestResult(i, p, max_new=getattr(self.params[i], "max_new_tokens", None)) for i, p in enumerate(prompts)
        ]
        self.image = image
        if image is not None:  # the engine's processor makes the ids: the prompt goes as text with its placeholder
            self._texts, self.prompt_lens = image_requests(engine, prompts, use_chat_template, image)
            self._ids = [None] * len(prompts)
        else:
            self._ids = [build_prompt_ids(engine.tokenizer, p, use_chat_template) for p in prompts]
            self._texts = list(prompts)
            self.prompt_lens = [len(i) if i else len(engine.tokenizer.encode(p)) for i, p in zip(self._ids, prompts)]
        self._lock = threading.Lock()  # held only to copy or change `results` (the sink runs on the engine's loop)
        self._handles: dict[int, object] = {}  # request index -> its RequestStream (for abort and check_serving)
        self._unfinished = set(range(len(prompts)))
        self._all_done = threading.Event()
        if not prompts:
            self._all_done.set()
        self.start_time = 0.0
        self.end_time: float | None = None
        self.since_step = engine.stats().num_steps - 1
        self.t0 = 0.0

    def start(self) -> "Workload":
        self.engine.start_background_loop()
        self.start_time = time.perf_counter()
        self.t0 = self.start_time - self.engine.stats().started_at  # the run's start on the engine's clock
        if self.gap_s:  # one thread sends them in time
            threading.Thread(target=self._send_staggered, name="ui-arrivals", daemon=True).start()
        else:
            for i in range(len(self.results)):
                self._send(i)
        return self

    def _send_staggered(self) -> None:
        for i in range(len(self.results)):
            if i and self.cancel.wait(self.gap_s):  # stopped: the rest are never sent
                for j in range(i, len(self.results)):
                    self._end(j, finish_reason="abort")
                return
            self._send(i)

    def _send(self, i: int) -> None:
        if self.cancel.is_set():
            self._end(i, finish_reason="abort")
            return
        prompt = None if self._ids[i] else self._texts[i]
        extra = {} if self.image is None else dict(images=[self.image])  # text requests: the call as before
        try:
            handle = self.engine.open_stream(
                prompt,
                self.params[i],
                prompt_token_ids=self._ids[i],
                owner=self.owner,
                sink=partial(self._take, i),
                **extra,
            )
        except Exception as e:  # a bad request (too long, a closed engine) fails only this row
            self._end(i, error=f"{type(e).__name__}: {e}")
            return
        with self._lock:
            self.results[i].request_id = handle.request_id
            self._handles[i] = handle
        if self.cancel.is_set():  # stop() ran meanwhile and did not see it
            handle.abort()

    def _take(self, i: int, delta) -> None:
        """The sink of request i, called on the engine's loop: record the delta (a short lock, never a wait)."""
        out = delta.output
        with self._lock:
            res = self.results[i]
            res.text, res.token_ids = out.text, list(out.token_ids)
            res.finish_reason, res.ttft, res.latency = out.finish_reason, out.ttft, out.latency
            res.error = out.error
            if delta.finished:
                self._finished_locked(i)

    def _end(self, i: int, finish_reason: str | None = None, error: str | None = None) -> None:
        with self._lock:
            res = self.results[i]
            res.finish_reason = res.finish_reason or finish_reason
            res.error = res.error or error
            self._finished_locked(i)

    def _finished_locked(self, i: int) -> None:
        if i in self._unfinished:
            self._unfinished.discard(i)
            self.end_time = time.perf_counter()  # the last to finish sets it last
            if not self._unfinished:
                self._all_done.set()

    def stop(self) -> None:
        """Cancel: abort every request sent so far (before its first token too); later ones are not sent."""
        self.cancel.set()
        with self._lock:
            handles = list(self._handles.values())
        for handle in handles:
            handle.abort()

    @property
    def done(self) -> bool:
        return self._all_done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds for every request to finish; a request the engine stopped serving (closed,
        its loop dead) ends with that error instead of waiting for a delta that will not come."""
        if self._all_done.wait(timeout):
            return True
        from backend.core.errors import RequestFailedError

        with self._lock:
            pending = [(i, self._handles[i]) for i in self._unfinished if i in self._handles]
        for i, handle in pending:
            try:
                handle.check_serving()
            except RequestFailedError as e:
                self._end(i, error=f"{type(e).__name__}: {e}")
        return self.done

    @property
    def wall_s(self) -> float:
        end = self.end_time if self.done and self.end_time is not None else time.perf_counter()
        return end - self.start_time

    def snapshot(self) -> tuple[list[RequestResult], Series]:
        with self._lock:
            results = [RequestResult(**vars(r)) for r in self.results]
        return results, series_from_stats(self.engine.step_history(self.since_step), self.t0)
