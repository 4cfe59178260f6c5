"""What every route reads: the engine (one, or whichever the app has loaded), the served name, the limits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from backend.hosting import HostPolicy, VisitorLimiter
from backend.hosting.api_key import key_problem
from backend.server.errors import APIError
from backend.server.health import fatal_problem
from backend.server.metrics import ServerMetrics
from backend.server.prompt_size import PromptByteCap
from backend.server.prompts import load_chat_template


@dataclass(frozen=True)
class ServerLimits:
    """Per-request bounds (each a 400 when passed) and the default output lengths."""

    max_n: int = 16  # choices per prompt
    max_choices: int = 64  # prompts x n in one request
    default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    chat_max_tokens: int = 1024  # /v1/chat/completions without max_tokens: the rest of the context, at most this


class ServerState:
    def __init__(
        self,
        engine,
        served_model_name: str | None = None,
        api_key: str | None = None,
        chat_template: str | None = None,
        limits: ServerLimits | None = None,
        policy: HostPolicy | None = None,
    ) -> None:
        """`engine`: an Engine, or a callable returning the current one (None while none is loaded: 503).
        `policy`: the host's caps (backend/hosting; default: none) and `visitors`, the parallel sequences each
        visitor runs now."""
        self._get: Callable = engine if callable(engine) and not hasattr(engine, "stream") else (lambda: engine)
        self._served_name = served_model_name
        self.api_key = api_key or None
        self.chat_template = load_chat_template(chat_template)
        self.limits = limits or ServerLimits()
        self.policy = policy or HostPolicy()
        self.visitors = VisitorLimiter(self.policy)
        self.metrics = ServerMetrics(self.current_engine, self.model_name)
        self.prompt_bytes = PromptByteCap()

    def current_engine(self):
        engine = self._get()
        return None if engine is None or engine.closed else engine

    def engine(self):
        """The engine to serve this request with; a 503 when there is none or it cannot serve (closed, its
        tensor-parallel group down)."""
        engine = self.current_engine()
        if engine is None:
            raise APIError(503, "no model is loaded (or the server is shutting down)", code="model_not_loaded")
        problem = fatal_problem(engine)
        if problem is not None:
            raise APIError(503, problem, code="engine_unavailable")
        return engine

    def model_name(self) -> str:
        if self._served_name:
            return self._served_name
        engine = self._get()
        return str(engine.config.model) if engine is not None else "none"

    def prompt_token_cap(self, engine) -> int:
        """The most tokens a prompt may have: the host's cap, and room for one new token in the context."""
        room = engine.max_model_len - 1
        cap = self.policy.max_prompt_tokens
        return room if cap is None else min(cap, room)

    def check_prompt_bytes(self, engine, nbytes: int, param: str) -> None:
        """A 400 for a prompt of `nbytes` bytes that cannot fit the token cap (backend/server/prompt_size.py)."""
        problem = self.prompt_bytes.problem(engine.tokenizer, self.prompt_token_cap(engine), nbytes)
        if problem is not None:
            raise APIError(400, problem, param, "context_length_exceeded")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name():
            raise APIError(
                404,
                f"The model {name!r:.200} does not exist; this server serves {self.model_name()!r}",
                "model",
                "model_not_found",
            )

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        problem = key_problem(request.headers.getlist("authorization"), self.api_key)
        if problem is not None:
            raise APIError(401, problem, code="invalid_api_key")
