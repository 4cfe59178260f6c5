"""The OpenAI-compatible API as a FastAPI app: `build_app(engine, ...)`.

    POST /v1/completions, /v1/chat/completions (stream: true -> server-sent events ending in data: [DONE])
    GET  /v1/models, /v1/models/{id}, /health, /metrics (Prometheus), /docs and /openapi.json
    POST /tokenize, /detokenize

One engine serves every client: each request's `engine.stream(...)` runs in a worker thread and the
engine's background loop batches them. A client that disconnects has its requests aborted at once.
Every error is an OpenAI error body (`backend/server/errors.py`); bad input is a 4xx, never a 500.
With `api_key`, every route but /health and /metrics needs `Authorization: Bearer <key>`. With a host `policy`
(backend/hosting): its caps on each request, its per-visitor parallel sequences, and `hosting_middlewares` puts
its API key (also on /health and /metrics unless public) and body size limit in front of the app.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backend.hosting import ApiKeyMiddleware, BodySizeLimitMiddleware, ForwardedClientMiddleware, HostPolicy
from backend.hosting.api_key import OPENAI_PREFIXES
from backend.hosting.timeouts import BodyTimeoutMiddleware, ConnectionTimeouts
from backend.server.chat import create_chat_completion
from backend.server.completions import create_completion
from backend.server.errors import APIError, bad_request, install_error_handlers
from backend.server.prompts import chat_input, check_ids, encode_text
from backend.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from backend.server.state import ServerLimits, ServerState

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 500, 503)}
STREAM = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream: true"}}


def api_router(state: ServerState) -> APIRouter:
    """The routes that need the API key (when one is set)."""

    async def authorized(request: Request) -> None:  # a header comparison: on the event loop, not in a worker thread
        state.authorize(request)

    router = APIRouter(dependencies=[Depends(authorized)], responses=ERRORS)
    created = int(time.time())

    def card() -> ModelCard:
        engine = state.engine()
        return ModelCard(
            id=state.model_name(),
            created=created,
            root=str(engine.config.model),
            max_model_len=engine.max_model_len,
            model_impl=engine.model_impl,
        )

    @router.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str) -> ModelCard:
        state.check_model(model_id)
        return card()

    @router.post("/v1/completions", response_model=CompletionResponse, responses=STREAM)
    async def completions(req: CompletionRequest, request: Request):
        return await create_completion(state, req, request)

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAM)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await create_chat_completion(state, req, request)

    @router.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        return await asyncio.to_thread(tokenize_body, state, req)  # off the event loop

    @router.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        return await asyncio.to_thread(detokenize_body, state, req)  # off the event loop

    return router


def tokenize_body(state: ServerState, req: TokenizeRequest) -> TokenizeResponse:
    engine = state.engine()
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give prompt or messages (one of them)", "prompt")
    if req.prompt is not None:
        ids = encode_text(state, engine, req.prompt, add_special_tokens=req.add_special_tokens)
    else:
        ids = chat_input(state, engine, req.messages, state.chat_template, req.add_generation_prompt).ids
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_model_len)


def detokenize_body(state: ServerState, req: DetokenizeRequest) -> DetokenizeResponse:
    engine = state.engine()
    state.check_model(req.model)
    if engine.tokenizer is None:
        raise bad_request("this model was loaded without a tokenizer", "tokens")
    ids = []
    if req.tokens:
        try:
            ids = check_ids(engine, req.tokens, "tokens")
        except APIError as e:
            if e.code != "context_length_exceeded":  # any number of tokens decodes
                raise
            ids = list(req.tokens)
    return DetokenizeResponse(prompt=engine.tokenizer.decode(ids))


def public_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> JSONResponse:
        state.engine()  # 503 when there is no engine or it cannot serve (closed, tensor-parallel group down)
        return JSONResponse({"status": "ok"})

    @router.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def add_openai_routes(app: FastAPI, state: ServerState) -> FastAPI:
    """Put the API's routes and error handlers on `app` (the app's own FastAPI app for `app.py --api`)."""
    install_error_handlers(app)
    app.include_router(public_router(state))
    app.include_router(api_router(state))
    app.state.flab = state
    return app


def build_app(
    engine,
    served_model_name: str | None = None,
    api_key: str | None = None,
    chat_template: str | None = None,
    limits: ServerLimits | None = None,
    policy: HostPolicy | None = None,
    timeouts: ConnectionTimeouts | None = None,
) -> FastAPI:
    """The API over `engine` (an Engine, or a callable returning the current one or None).

    `served_model_name`: the `model` clients send and /v1/models lists (default: the engine's model string).
    `chat_template`: a Jinja template or a file holding one, used instead of the tokenizer's.
    `policy`: the host's policy; with one, its API key and body limit guard the app (`api_key` must then be
    None: the policy holds the key). `timeouts`: the request body's deadline (default ConnectionTimeouts(); the
    head and keep-alive bounds are uvicorn's, see backend/hosting/timeouts.py uvicorn_options)."""
    if policy is not None and api_key is not None:
        raise ValueError("give the API key in the policy (HostPolicy.api_key), not both")
    state = ServerState(engine, served_model_name, api_key, chat_template, limits, policy)
    app = FastAPI(
        title="Fallback Lab OpenAI-compatible API",
        description="Completions and chat completions over the Fallback Lab engine.",
        version="1.0",
    )
    add_openai_routes(app, state)
    app.add_middleware(BodyTimeoutMiddleware, seconds=(timeouts or ConnectionTimeouts()).body_s)
    if policy is not None:
        hosting_middlewares(app, policy)
    return app


def hosting_middlewares(app, policy: HostPolicy, prefixes: tuple[str, ...] | None = None) -> None:
    """The policy's body size limit, then its API key (a request without the key is refused before its body is
    read), then, outermost, the client's address through the host's trusted proxies (the visitor's address; run
    uvicorn with proxy_headers=False so this is the one rule). `prefixes`: the paths the key guards (None: every
    path; app.py --api passes OPENAI_PREFIXES so the Gradio UI stays open)."""
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=policy.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, policy=policy, prefixes=prefixes)
    app.add_middleware(ForwardedClientMiddleware, trusted=policy.forwarded_allow_ips)


__all__ = ["OPENAI_PREFIXES", "add_openai_routes", "build_app", "hosting_middlewares"]
