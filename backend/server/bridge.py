"""The engine's request streams, pushed into asyncio.

One `ChoiceStreams` holds the engine requests of one API request (its prompts times `n`). Each is opened with
`engine.open_stream(..., sink=...)`: the engine's loop calls the sink with each delta as it publishes it, and the
sink hands it, time-stamped, to the event loop with `loop.call_soon_threadsafe` (no thread per request, no
polling). `cancel()` (a client that went away) aborts every request at once, queued ones before their first token
included: each request's id is known as soon as it is queued. A request the engine stops serving (closed, loop
dead) is noticed by `events()` while it waits.

Siblings of one prompt (`n` > 1) start after the first one's first delta: its prompt blocks are then in the
prefix cache and the others take them instead of computing the prompt again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from backend.core.errors import RequestFailedError
from backend.core.outputs import StreamDelta
from backend.core.sampling import SamplingParams
from backend.core.streams import LISTENER_POLL_S


@dataclass
class ChoiceEvent:
    index: int  # the choice (prompt_index * n + j)
    time: float  # time.perf_counter() when the engine published it
    delta: StreamDelta | None = None
    error: BaseException | None = None  # the request failed (RequestError, RequestFailedError, ...)
    done: bool = False  # the choice ended (after its last delta or its error)


@dataclass
class ChoiceSpec:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    owner: str | None = None  # the request's `user`: the engine schedules fairly across owners
    prompt: str | None = None  # with images: the prompt text the engine's processor expands
    images: list | None = None  # decoded images: the request is opened with prompt + images, in a worker thread


class ChoiceStreams:
    def __init__(self, engine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self.queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue()
        self._cancelled = False
        self._handles: dict[int, object] = {}  # choice index -> the engine's RequestStream, while it runs
        self._siblings: dict[int, list[ChoiceSpec]] = {}  # first choice of a prompt -> the others, until they start
        self._running = 0
        self._ended: set[int] = set()  # choices whose done event was queued
        self.started_at = time.perf_counter()

    # --- engine side: called on the engine's thread ---------------------------------------------

    def _sink(self, index: int):
        def push(delta: StreamDelta) -> None:
            try:
                self.loop.call_soon_threadsafe(self._on_delta, index, delta, time.perf_counter())
            except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
                pass

        return push

    # --- event loop side ------------------------------------------------------------------------

    def _on_delta(self, index: int, delta: StreamDelta, at: float) -> None:
        if index in self._siblings:  # its first delta: the prompt's blocks are cached, the siblings start
            self._open_all(self._siblings.pop(index))
        if index in self._ended:
            return
        if delta.finished and delta.finish_reason == "error":
            error = RequestFailedError(f"request {delta.request_id} failed: {delta.output.error}", delta.request_id)
            self._end(index, at, error)
            return
        if not self._cancelled:
            self.queue.put_nowait(ChoiceEvent(index, at, delta=delta))
        if delta.finished:
            self._end(index, at)

    def _end(self, index: int, at: float, error: BaseException | None = None) -> None:
        """The choice's last events (its error, if any, then done), once."""
        if index in self._ended:
            return
        self._ended.add(index)
        self._handles.pop(index, None)
        if error is not None:
            self.queue.put_nowait(ChoiceEvent(index, at, error=error))
        self.queue.put_nowait(ChoiceEvent(index, at, done=True))

    def _open(self, spec: ChoiceSpec) -> bool:
        """Queue one choice's engine request; a refusal is reported as that choice's error (and it ends). A request
        with images is opened in a worker thread (the engine's processor prepares the pixels there)."""
        if self._cancelled:
            self._end(spec.index, time.perf_counter())
            return False
        if spec.images:
            self.loop.run_in_executor(None, self._open_images, spec)
            return True
        try:
            handle = self.engine.open_stream(
                None, spec.params, prompt_token_ids=spec.prompt_ids, owner=spec.owner, sink=self._sink(spec.index)
            )
        except Exception as e:  # reported to the handler, which answers the client
            self._end(spec.index, time.perf_counter(), e)
            return False
        self._handles[spec.index] = handle  # its deltas arrive after this (call_soon_threadsafe)
        return True

    def _open_images(self, spec: ChoiceSpec) -> None:
        """Worker thread: open an image-text request, then hand the handle (or the refusal) to the event loop."""
        handle, error = None, None
        try:
            handle = self.engine.open_stream(
                spec.prompt, spec.params, owner=spec.owner, sink=self._sink(spec.index), images=spec.images
            )
        except Exception as e:
            error = e
        try:
            self.loop.call_soon_threadsafe(self._opened, spec.index, handle, error)
        except RuntimeError:  # the event loop is gone: nobody will read it
            if handle is not None:
                handle.abort()

    def _opened(self, index: int, handle, error: BaseException | None) -> None:
        if error is not None:
            self._end(index, time.perf_counter(), error)
            if index in self._siblings:  # failed before its first delta: the siblings still run (and report)
                self._open_all(self._siblings.pop(index))
            return
        if self._cancelled or index in self._ended:  # cancelled (or already finished) meanwhile
            handle.abort()
            return
        self._handles[index] = handle

    def _open_all(self, specs: list[ChoiceSpec]) -> None:
        for spec in specs:
            self._open(spec)

    def start(self, groups: list[list[ChoiceSpec]]) -> None:
        """Each group: the choices of one prompt (the first starts now, the rest after its first delta)."""
        self._running = sum(len(g) for g in groups)
        for group in groups:
            first, rest = group[0], list(group[1:])
            if rest:
                self._siblings[first.index] = rest
            if not self._open(first) and rest:  # failed before its first delta: the siblings still run (and report)
                self._open_all(self._siblings.pop(first.index))

    def cancel(self) -> None:
        """Abort every request of this API request now (a disconnected client, a failed sibling)."""
        self._cancelled = True
        for handle in list(self._handles.values()):
            handle.abort()  # returns at once: the engine applies it between steps
        for rest in self._siblings.values():  # never started: they end without a request
            for spec in rest:
                self._end(spec.index, time.perf_counter())
        self._siblings.clear()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _check_serving(self) -> None:
        """A request the engine stopped serving (closed, loop dead) ends with its error."""
        for index, handle in list(self._handles.items()):
            try:
                handle.check_serving()
            except RequestFailedError as e:
                self._end(index, time.perf_counter(), e)

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """Every event until every choice has ended."""
        while self._running:
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=LISTENER_POLL_S)
            except asyncio.TimeoutError:
                self._check_serving()
                continue
            if event.done:
                self._running -= 1
            yield event
