"""RequestStream: one streaming request's handle (Engine.open_stream). The engine's loop pushes each delta into the
handle's own queue as it publishes it; the consumer's thread blocks on that queue (no polling of the engine)."""

from __future__ import annotations

import queue
from typing import Protocol

from backend.core.errors import RequestFailedError
from backend.core.outputs import StreamDelta
from backend.core.requests import Request

LISTENER_POLL_S = 0.5  # how often a waiting consumer checks that the engine still serves its request


class StreamOwner(Protocol):
    def abort(self, request_id: int) -> None: ...
    def check_serving(self, req: Request) -> None: ...
    def wait_done(self, req: Request) -> None: ...


class RequestStream:
    """One streaming request (Engine.open_stream): an iterator of its deltas, and its id from the start. Use it in a
    `with` block: leaving the block, `close()` or `abort()` (from any thread, before its first token too) aborts it
    unless it finished, and frees its blocks. A request that fails while running raises RequestFailedError after
    its last delta; so does one the engine stops serving (closed, loop dead)."""

    def __init__(self, engine: StreamOwner, req: Request, deltas: queue.SimpleQueue | None) -> None:
        self._engine, self._req, self._deltas = engine, req, deltas
        self.request_id: int = req.seq.seq_id
        self.finished = False  # its final delta was handed out

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> StreamDelta:
        if self._deltas is None:
            raise TypeError("this stream's deltas go to the sink it was opened with")
        while not self.finished:
            try:
                delta = self._deltas.get(timeout=LISTENER_POLL_S)
            except queue.Empty:
                self.check_serving()
                continue
            self.finished = delta.finished
            if delta.finished and delta.finish_reason == "error":
                raise RequestFailedError(f"request {self.request_id} failed: {delta.output.error}", self.request_id)
            return delta
        raise StopIteration

    def check_serving(self) -> None:
        """Raise RequestFailedError when the engine stopped serving this unfinished request (closed, loop dead)."""
        self._engine.check_serving(self._req)

    def abort(self) -> None:
        """Ask the engine to abort the request; returns at once (the engine frees its blocks between steps)."""
        self._engine.abort(self.request_id)

    def close(self) -> None:
        """Abort the request unless its final delta was handed out, and wait until the engine dropped it (at most
        the step in progress); idempotent."""
        if not self.finished:
            self.abort()
            self._engine.wait_done(self._req)

    def __enter__(self) -> "RequestStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
