"""The engine's blocking `stream()` iterators, run in worker threads and read from asyncio.

One `ChoiceStreams` holds the engine requests of one API request (its prompts times `n`). Each request's
`engine.open_stream(...)` is read in its own thread (the engine's background loop batches them with everything
else in flight); its deltas arrive, time-stamped, on one asyncio queue. `cancel()` (a client that went away)
aborts every request at once, queued ones before their first token included: each request's id is known as
soon as it is queued.

Siblings of one prompt (`n` > 1) start after the first one's first delta: its prompt blocks are then in the
prefix cache and the others take them instead of computing the prompt again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from backend.outputs import StreamDelta
from backend.sampling import SamplingParams


@dataclass
class ChoiceEvent:
    index: int  # the choice (prompt_index * n + j)
    time: float  # time.perf_counter() when the thread received it
    delta: StreamDelta | None = None
    error: BaseException | None = None  # the request failed (RequestError, RequestFailedError, ...)
    done: bool = False  # the choice's thread ended (after its last delta or its error)


@dataclass
class ChoiceSpec:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    owner: str | None = None  # the request's `user`: the engine schedules fairly across owners


class ChoiceStreams:
    def __init__(self, engine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self.queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._request_ids: dict[int, int] = {}
        self._running = 0
        self.started_at = time.perf_counter()

    # --- worker side ----------------------------------------------------------------------------

    def _put(self, event: ChoiceEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass

    def _run(self, spec: ChoiceSpec, siblings: list[ChoiceSpec]) -> None:
        handle = None
        try:
            if self._cancel.is_set():
                return
            handle = self.engine.open_stream(None, spec.params, prompt_token_ids=spec.prompt_ids, owner=spec.owner)
            with self._lock:  # cancel() now aborts it, or it sees the flag set before
                self._request_ids[spec.index] = handle.request_id
                cancelled = self._cancel.is_set()
            if cancelled:
                handle.abort()
            for delta in handle:
                if siblings:
                    self._spawn(siblings)
                    siblings = []
                if self._cancel.is_set():
                    break
                self._put(ChoiceEvent(spec.index, time.perf_counter(), delta=delta))
        except BaseException as e:  # reported to the handler, which answers the client
            self._put(ChoiceEvent(spec.index, time.perf_counter(), error=e))
        finally:
            if handle is not None:
                handle.close()  # aborts the request if it has not finished
            if siblings:  # failed before its first delta: the siblings still run (and report)
                self._spawn(siblings)
            self._put(ChoiceEvent(spec.index, time.perf_counter(), done=True))

    def _spawn(self, specs: list[ChoiceSpec]) -> None:
        for spec in specs:
            threading.Thread(target=self._run, args=(spec, []), name=f"api-choice-{spec.index}", daemon=True).start()

    # --- handler side ---------------------------------------------------------------------------

    def start(self, groups: list[list[ChoiceSpec]]) -> None:
        """Each group: the choices of one prompt (the first starts now, the rest after its first delta)."""
        self._running = sum(len(g) for g in groups)
        for group in groups:
            first, rest = group[0], list(group[1:])
            threading.Thread(
                target=self._run, args=(first, rest), name=f"api-choice-{first.index}", daemon=True
            ).start()

    def cancel(self) -> None:
        """Abort every request of this API request now (a disconnected client, a failed sibling)."""
        self._cancel.set()
        with self._lock:
            ids = list(self._request_ids.values())
        for rid in ids:
            self.engine.abort(rid)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """Every event until every choice's thread has ended."""
        while self._running:
            event = await self.queue.get()
            if event.done:
                self._running -= 1
            yield event
