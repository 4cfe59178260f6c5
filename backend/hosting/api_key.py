"""The API's front door: a Bearer key compared in constant time, and a request body size limit (pure ASGI, so
they wrap the server's FastAPI app and the app's Gradio FastAPI alike). Refusals are OpenAI error bodies:
`{"error": {"message", "type", "param", "code"}}`.

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=policy.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, policy=policy, prefixes=OPENAI_PREFIXES)  # prefixes: None = every path

or, per route, `Depends(require_api_key(policy))`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request

from backend.hosting.policy import HostPolicy

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPENAI_PREFIXES = ("/v1", "/tokenize", "/detokenize", "/health", "/metrics")
MISSING_KEY = "missing API key: send 'Authorization: Bearer <key>'"
WRONG_KEY = "incorrect API key provided"
DUPLICATE_KEY = "send one Authorization header, not several"
TYPES = {401: "authentication_error", 413: "invalid_request_error"}


def error_body(status: int, message: str, code: str | None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": None, "code": code}}
    ).encode()


def key_problem(authorization: str | list[str] | None, api_key: str) -> str | None:
    """None when `authorization` (the request's Authorization header, or all of them) is one 'Bearer <api_key>';
    else the message to send. Two headers are refused (proxies and servers disagree on which one counts). Both
    sides are hashed first, so the comparison takes the same time whatever the key's length or the first
    differing byte."""
    if isinstance(authorization, list):
        if len(authorization) > 1:
            return DUPLICATE_KEY
        authorization = authorization[0] if authorization else None
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return MISSING_KEY
    given = hashlib.sha256(token.encode()).digest()
    expected = hashlib.sha256(api_key.encode()).digest()
    return None if hmac.compare_digest(given, expected) else WRONG_KEY


def is_exempt(path: str, policy: HostPolicy) -> bool:
    return (path == "/health" and policy.health_public) or (path == "/metrics" and policy.metrics_public)


async def send_error(send: Send, status: int, message: str, code: str | None, headers: dict | None = None) -> None:
    body = error_body(status, message, code)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """Every HTTP request under `prefixes` (None: every path) needs 'Authorization: Bearer <policy.api_key>';
    /health and /metrics are exempt when the policy makes them public. No key in the policy: no check."""

    def __init__(self, app: ASGIApp, policy: HostPolicy, prefixes: tuple[str, ...] | None = None) -> None:
        self.app, self.policy, self.prefixes = app, policy, prefixes

    def _guarded(self, path: str) -> bool:
        if self.policy.api_key is None or is_exempt(path, self.policy):
            return False
        return self.prefixes is None or any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self._guarded(scope.get("path", "")):
            return await self.app(scope, receive, send)
        given = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        problem = key_problem(given, self.policy.api_key)
        if problem is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": problem})
            return
        await send_error(send, 401, problem, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def require_api_key(policy: HostPolicy) -> Callable[[Request], None]:
    """A FastAPI dependency doing ApiKeyMiddleware's check for the routes it is put on; raises starlette's
    HTTPException(401) (the server's error handlers turn it into an OpenAI body)."""

    def dependency(request: Request) -> None:
        if policy.api_key is None or is_exempt(request.url.path, policy):
            return
        problem = key_problem(request.headers.getlist("authorization"), policy.api_key)
        if problem is not None:
            raise HTTPException(401, detail=problem, headers={"WWW-Authenticate": "Bearer"})

    return dependency


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """Refuse request bodies over `max_bytes` (None: no limit) with a 413: at once from Content-Length, else when
    the streamed body passes the limit (the app's own answer to the cut-off body is replaced by the 413)."""

    def __init__(self, app: ASGIApp, max_bytes: int | None) -> None:
        self.app, self.max_bytes = app, max_bytes

    def message(self) -> str:
        return f"the request body is over this server's limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes is None:
            return await self.app(scope, receive, send)
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                if declared is not None and declared > self.max_bytes:
                    return await send_error(send, 413, self.message(), "request_too_large")
        state = {"seen": 0, "over": False, "started": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.max_bytes:
                    state["over"] = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if state["over"]:
                if not state["started"]:  # the app answered the cut-off body: answer 413 instead, once
                    state["started"] = True
                    await send_error(send, 413, self.message(), "request_too_large")
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not state["started"]:
                state["started"] = True
                await send_error(send, 413, self.message(), "request_too_large")
