"""POST /v1/chat/completions: messages through the chat template (image parts for an image-text model), `n`
choices, whole or streamed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request

import backend.server.sse as sse
from backend.server.bridge import ChoiceSpec
from backend.server.completions import usage
from backend.server.errors import APIError
from backend.server.generation import ChoiceRun
from backend.server.hosting import answer, check_caps, default_length, visitor_id
from backend.server.logprobs import TokenText, chat_logprobs
from backend.server.params import check_unsupported, max_new_tokens, sampling_params, with_seed
from backend.server.prompts import chat_input
from backend.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaMessage,
    new_id,
)
from backend.server.state import ServerState


class ChatJob:
    def __init__(self, state: ServerState, req: ChatCompletionRequest, visitor: str | None = None) -> None:
        """`visitor`: who asks (backend/server/hosting.py visitor_id): the engine owner of every choice."""
        self.arrival = time.perf_counter()
        self.state = state
        self.req = req
        self.engine = engine = state.engine()
        state.check_model(req.model)
        check_unsupported(req, state.limits.max_n)
        if req.n > state.limits.max_choices:
            raise APIError(400, f"n must be at most {state.limits.max_choices}", "n", "invalid_value")
        chat = chat_input(
            state, engine, req.messages, state.chat_template, req.add_generation_prompt, req.chat_template_kwargs
        )
        self.prompt_ids = chat.ids
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        check_caps(state.policy, requested, [len(self.prompt_ids)], param, "messages")
        default = default_length(state.policy, state.limits.chat_max_tokens)
        max_tokens = max_new_tokens(requested, param, len(self.prompt_ids), engine.max_model_len, default, "messages")
        self.visitor = visitor if visitor is not None else req.user
        self.top = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(req, max_tokens, self.top)
        self.groups = [
            [
                ChoiceSpec(j, self.prompt_ids, with_seed(params, req.seed, j), self.visitor, chat.text, chat.images)
                for j in range(req.n)
            ]
        ]
        self.token_text = TokenText(engine.tokenizer)
        self.model = state.model_name()

    def run(self) -> ChoiceRun:
        return ChoiceRun(self.engine, self.state.metrics, self.groups, self.arrival).start()

    def _logprobs(self, output, token_ids: list[int]) -> ChatLogprobs | None:
        if self.top is None:
            return None
        k = len(token_ids)
        lps = output.logprobs[len(output.logprobs) - k :] if k else []
        tops = output.top_logprobs[len(output.top_logprobs) - k :] if (k and output.top_logprobs) else None
        return ChatLogprobs(content=chat_logprobs(self.token_text, token_ids, lps, tops))

    def _choices(self, outputs: dict) -> list[ChatChoice]:
        return [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=outputs[i].text),
                logprobs=self._logprobs(outputs[i], outputs[i].token_ids),
                finish_reason=outputs[i].finish_reason,
            )
            for i in sorted(outputs)
        ]

    async def respond(self, request: Request) -> ChatCompletionResponse:
        run = self.run()
        outputs = await run.collect(request)
        if not run.complete:
            raise APIError(499, "client closed the request", code="client_closed")
        choices = await asyncio.to_thread(self._choices, outputs)  # logprobs detokenize: off the event loop
        completion = sum(len(o.token_ids) for o in outputs.values())
        self.state.metrics.observe_usage([len(self.prompt_ids)], completion)
        cached = sum(o.num_cached_tokens for o in outputs.values())
        return ChatCompletionResponse(
            model=self.model, choices=choices, usage=usage([len(self.prompt_ids)], completion, cached)
        )

    async def events(self) -> AsyncIterator[str]:
        """The SSE stream of this request (`answer` sends it)."""
        run = self.run()  # started once the response streams (not for a client gone before that)
        try:
            base = ChatCompletionChunk(id=new_id("chatcmpl"), created=int(time.time()), model=self.model, choices=[])
            include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
            completion = 0
            for j in range(self.req.n):  # the role first, as OpenAI streams it
                role = ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))
                yield sse.event(base.model_copy(update={"choices": [role]}))
            try:
                async for index, delta in run.deltas():
                    if delta.finished:
                        completion += len(delta.output.token_ids)
                    if not (delta.text or delta.token_ids or delta.finished):
                        continue
                    choice = ChatChunkChoice(
                        index=index,
                        delta=DeltaMessage(content=delta.text or None) if delta.text else DeltaMessage(),
                        logprobs=self._logprobs(delta.output, delta.token_ids),
                        finish_reason=delta.finish_reason if delta.finished else None,
                    )
                    yield sse.event(base.model_copy(update={"choices": [choice]}))
                self.state.metrics.observe_usage([len(self.prompt_ids)], completion)
                if include_usage:
                    yield sse.event(base.model_copy(update={"usage": usage([len(self.prompt_ids)], completion)}))
            except APIError as e:
                yield sse.error_event(e)
            yield sse.DONE
        finally:
            run.cancel()  # a client that went away: abort at once


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, request: Request):
    # the chat template and the tokenizer run off the event loop: a long conversation holds no other client
    job = await asyncio.to_thread(ChatJob, state, req, visitor_id(request, req.user, state.policy))
    return await answer(job, req.n, req.stream, request)
