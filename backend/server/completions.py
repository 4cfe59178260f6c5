"""POST /v1/completions: text (or token id) prompts, `n` choices each, whole or streamed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request

import backend.server.sse as sse
from backend.server.bridge import ChoiceSpec
from backend.server.errors import APIError, bad_request
from backend.server.generation import ChoiceRun
from backend.server.hosting import answer, check_caps, default_length, visitor_id
from backend.server.logprobs import TokenText, completion_logprobs
from backend.server.params import check_unsupported, max_new_tokens, sampling_params, with_seed
from backend.server.prompts import completion_prompts
from backend.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from backend.server.state import ServerState


def usage(prompt_lens: list[int], completion_tokens: int, cached: int = 0) -> Usage:
    prompt = sum(prompt_lens)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion_tokens,
        total_tokens=prompt + completion_tokens,
        prompt_tokens_details={"cached_tokens": cached},
    )


class CompletionJob:
    """The prompts, their engine requests and how their outputs are written back."""

    def __init__(self, state: ServerState, req: CompletionRequest, visitor: str | None = None) -> None:
        """`visitor`: who asks (backend/server/hosting.py visitor_id): the engine owner of every choice."""
        self.arrival = time.perf_counter()
        self.state = state
        self.req = req
        self.engine = engine = state.engine()
        state.check_model(req.model)
        limits = state.limits
        check_unsupported(req, limits.max_n)
        prompts = completion_prompts(state, engine, req.prompt)
        if len(prompts) * req.n > limits.max_choices:
            raise bad_request(
                f"{len(prompts)} prompts x n={req.n} asks for more than {limits.max_choices} choices", "n"
            )
        self.prompt_ids = [ids for _, ids in prompts]
        check_caps(state.policy, req.max_tokens, [len(ids) for ids in self.prompt_ids], "max_tokens", "prompt")
        default = default_length(state.policy, limits.default_max_tokens)
        self.visitor = visitor if visitor is not None else req.user
        self.echo_texts = [self._echo_text(text, ids) for text, ids in prompts] if req.echo else None
        lp = req.logprobs
        self.groups: list[list[ChoiceSpec]] = []
        for i, (_, ids) in enumerate(prompts):
            max_tokens = max_new_tokens(req.max_tokens, "max_tokens", len(ids), engine.max_model_len, default, "prompt")
            params = sampling_params(req, max_tokens, lp, lp if req.echo and lp is not None else None)
            self.groups.append(
                [ChoiceSpec(i * req.n + j, ids, with_seed(params, req.seed, j), self.visitor) for j in range(req.n)]
            )
        self.token_text = TokenText(engine.tokenizer)
        self.model = state.model_name()

    def _echo_text(self, text: str | None, ids: list[int]) -> str:
        if text is not None:
            return text
        tok = self.engine.tokenizer
        return tok.decode(ids, skip_special_tokens=self.req.skip_special_tokens) if tok is not None else ""

    def run(self) -> ChoiceRun:
        return ChoiceRun(self.engine, self.state.metrics, self.groups, self.arrival).start()

    def _prompt_logprobs(self, index: int, output) -> CompletionLogprobs:
        ids = self.prompt_ids[index // self.req.n]
        return completion_logprobs(
            self.token_text, ids, output.prompt_logprobs or [None] * len(ids), output.prompt_top_logprobs,
            self.req.logprobs, 0,
        )  # fmt: skip

    def _logprobs(self, index: int, output, token_ids: list[int], into: CompletionLogprobs | None):
        k = len(token_ids)
        lps = output.logprobs[len(output.logprobs) - k :] if k else []
        tops = output.top_logprobs[len(output.top_logprobs) - k :] if (k and output.top_logprobs) else None
        return completion_logprobs(self.token_text, token_ids, lps, tops, self.req.logprobs, 0, into)

    def _choices(self, outputs: dict) -> list[CompletionChoice]:
        choices = []
        for index in sorted(outputs):
            out = outputs[index]
            text = out.text
            logprobs = None
            if self.req.logprobs is not None:
                logprobs = self._prompt_logprobs(index, out) if self.req.echo else None
                logprobs = self._logprobs(index, out, out.token_ids, logprobs)
            if self.echo_texts is not None:
                text = self.echo_texts[index // self.req.n] + text
            choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=out.finish_reason))
        return choices

    async def respond(self, request: Request) -> CompletionResponse:
        run = self.run()
        outputs = await run.collect(request)
        if not run.complete:  # the client went away: nobody reads this
            raise APIError(499, "client closed the request", code="client_closed")
        choices = await asyncio.to_thread(self._choices, outputs)  # logprobs detokenize: off the event loop
        completion = sum(len(o.token_ids) for o in outputs.values())
        self.state.metrics.observe_usage([len(ids) for ids in self.prompt_ids], completion)
        cached = sum(o.num_cached_tokens for o in outputs.values())
        return CompletionResponse(
            model=self.model, choices=choices, usage=usage([len(i) for i in self.prompt_ids], completion, cached)
        )

    @property
    def num_sequences(self) -> int:
        return len(self.prompt_ids) * self.req.n

    async def events(self) -> AsyncIterator[str]:
        """The SSE stream of this request (`answer` sends it)."""
        run = self.run()  # started once the response streams (not for a client gone before that)
        try:
            base = CompletionResponse(model=self.model, choices=[])
            include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
            started: set[int] = set()
            completion = 0
            offsets: dict[int, CompletionLogprobs] = {}
            try:
                async for index, delta in run.deltas():
                    text = delta.text
                    logprobs = None
                    before = len(offsets[index].tokens) if index in offsets else 0
                    if index not in started:
                        started.add(index)
                        if self.echo_texts is not None:
                            text = self.echo_texts[index // self.req.n] + text
                            if self.req.logprobs is not None:
                                offsets[index] = self._prompt_logprobs(index, delta.output)
                    if self.req.logprobs is not None:
                        offsets[index] = self._logprobs(index, delta.output, delta.token_ids, offsets.get(index))
                        full = offsets[index]
                        logprobs = CompletionLogprobs(
                            tokens=full.tokens[before:],
                            token_logprobs=full.token_logprobs[before:],
                            top_logprobs=full.top_logprobs[before:],
                            text_offset=full.text_offset[before:],
                        )
                    if delta.finished:
                        completion += len(delta.output.token_ids)
                    if not (text or delta.token_ids or delta.finished):
                        continue
                    choice = CompletionChoice(
                        index=index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=delta.finish_reason if delta.finished else None,
                    )
                    yield sse.event(base.model_copy(update={"choices": [choice]}))
                prompt_lens = [len(ids) for ids in self.prompt_ids]
                self.state.metrics.observe_usage(prompt_lens, completion)
                if include_usage:
                    yield sse.event(base.model_copy(update={"usage": usage(prompt_lens, completion)}))
            except APIError as e:
                yield sse.error_event(e)
            yield sse.DONE
        finally:
            run.cancel()  # a client that went away: abort at once


async def create_completion(state: ServerState, req: CompletionRequest, request: Request):
    # tokenizing (and the echo's detokenizing) runs off the event loop: a long prompt holds no other client
    job = await asyncio.to_thread(CompletionJob, state, req, visitor_id(request, req.user, state.policy))
    return await answer(job, job.num_sequences, req.stream, request)
