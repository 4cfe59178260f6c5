"""One API request's engine requests, read from asyncio: errors as APIError, latencies into the metrics,
and an abort of everything when the client goes away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import Request

from backend.core.errors import EngineError, RequestFailedError
from backend.core.outputs import RequestOutput, StreamDelta
from backend.server.bridge import ChoiceSpec, ChoiceStreams
from backend.server.errors import APIError
from backend.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class ChoiceRun:
    def __init__(self, engine, metrics: ServerMetrics, groups: list[list[ChoiceSpec]], arrival: float) -> None:
        self.streams = ChoiceStreams(engine, asyncio.get_running_loop())
        self.metrics = metrics
        self.arrival = arrival
        self.groups = groups
        self._last_token: dict[int, float] = {}
        self._finished: set[int] = set()
        self.num_choices = sum(len(g) for g in groups)

    def start(self) -> "ChoiceRun":
        self.streams.start(self.groups)
        return self

    @property
    def complete(self) -> bool:
        return len(self._finished) == self.num_choices

    def cancel(self) -> None:
        if not self.complete:
            self.streams.cancel()

    def _observe(self, index: int, delta: StreamDelta, at: float) -> None:
        if delta.token_ids:
            last = self._last_token.get(index)
            if last is None:
                self.metrics.observe_first_token(at - self.arrival)
            else:
                gap = (at - last) / len(delta.token_ids)
                for _ in delta.token_ids:
                    self.metrics.observe_token_gap(gap)
            self._last_token[index] = at
        if delta.finished and delta.finish_reason in ("stop", "length"):
            self.metrics.observe_finished(delta.finish_reason, len(delta.output.token_ids), at - self.arrival)

    def _error(self, error: BaseException) -> APIError:
        if isinstance(error, APIError):
            return error
        if isinstance(error, EngineError):  # refused at add_request (checked before; kept for safety)
            return APIError(400, str(error), code="invalid_request")
        self.metrics.observe_failure()
        if isinstance(error, RequestFailedError):
            return APIError(500, f"the request failed while running: {error}", code="request_failed")
        logger.error("API request failed: %s: %s", type(error).__name__, error)
        return APIError(500, f"the request failed: {type(error).__name__}: {error}", code="internal_error")

    async def deltas(self) -> AsyncIterator[tuple[int, StreamDelta]]:
        """(choice index, delta) until every choice finished. A failing choice cancels the others and raises
        APIError; a request the engine aborted by itself (it is shutting down) raises a 503."""
        try:
            async for event in self.streams.events():
                if event.error is not None:
                    self.streams.cancel()
                    raise self._error(event.error)
                if event.delta is None:
                    continue
                delta = event.delta
                self._observe(event.index, delta, event.time)
                if delta.finished:
                    self._finished.add(event.index)
                    if delta.finish_reason == "abort" and not self.streams.cancelled:
                        self.streams.cancel()
                        raise APIError(503, "the request was aborted: the server is shutting down", code="aborted")
                yield event.index, delta
        finally:
            self.cancel()

    async def collect(self, request: Request | None) -> dict[int, RequestOutput]:
        """Every choice's final output; the engine requests are aborted if the client disconnects first."""
        watcher = asyncio.create_task(watch_disconnect(request, self)) if request is not None else None
        outputs: dict[int, RequestOutput] = {}
        try:
            async for index, delta in self.deltas():
                if delta.finished:
                    outputs[index] = delta.output
        finally:
            if watcher is not None:
                watcher.cancel()
        return outputs


async def watch_disconnect(request: Request, run: ChoiceRun) -> None:
    """Abort the run as soon as the client closes its connection."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            run.cancel()
            return
