"""Connection timeouts, so that a client cannot hold the server's sockets and tasks by doing nothing.

uvicorn closes a keep-alive connection that stays idle `timeout_keep_alive` seconds after a response, but a
connection that never sends a request (or sends its head one byte at a time) is never timed out, and nothing
bounds how long a request body may take to arrive. Three bounds, all in seconds (`ConnectionTimeouts`):

    head_s        a request's head (request line and headers) must arrive within this, counted from the moment
                  the connection opened or its previous response ended; else the connection is closed
    keep_alive_s  an idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive)
    body_s        a request's whole body must arrive within this, counted from the first read of it; else the
                  answer is a 408 (an OpenAI error body) and the connection is closed

`uvicorn_options(timeouts)` gives the uvicorn.Config arguments (an h11 protocol class with the head timer);
`BodyTimeoutMiddleware` (pure ASGI) bounds the body.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from backend.hosting.api_key import send_error
from backend.hosting.errors import HostingError


@dataclass(frozen=True)
class ConnectionTimeouts:
    head_s: float = 10.0
    keep_alive_s: float = 5.0
    body_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("head_s", "keep_alive_s", "body_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise HostingError(f"timeout {name} must be a number of seconds in (0, 3600], got {value!r}")


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head (`head_timeout_s`, set by `uvicorn_options`)."""

    head_timeout_s: float = ConnectionTimeouts.head_s

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no request head in time: nothing to answer

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request head arrived
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the next request's head, if the client sends one

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


def uvicorn_options(timeouts: ConnectionTimeouts) -> dict:
    """uvicorn.Config arguments for `timeouts` (the head and keep-alive bounds; the body's is a middleware)."""
    protocol = type("HeadTimeoutH11", (HeadTimeoutH11Protocol,), {"head_timeout_s": float(timeouts.head_s)})
    return {"http": protocol, "timeout_keep_alive": timeouts.keep_alive_s}


class _BodyTimedOut(Exception):
    pass


class BodyTimeoutMiddleware:
    """A request body must arrive whole within `seconds` of the app's first read of it: else a 408 and the
    connection closed. Reads after the body (an app waiting for the client to disconnect) are not bounded."""

    def __init__(self, app, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"deadline": None, "done": False, "timed_out": False, "started": False}

        async def timed_receive():
            if state["done"]:
                return await receive()
            if state["deadline"] is None:
                state["deadline"] = time.monotonic() + self.seconds
            left = state["deadline"] - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.0))
            except asyncio.TimeoutError:
                state["timed_out"] = True
                raise _BodyTimedOut from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["done"] = True
            return message

        async def guarded_send(message) -> None:
            if state["timed_out"]:
                return  # the 408 answers instead
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except _BodyTimedOut:
            pass
        if state["timed_out"] and not state["started"]:
            state["started"] = True
            message = f"the request body did not arrive within {self.seconds:g} s"
            await send_error(send, 408, message, "request_timeout", {"connection": "close"})
