"""API request fields -> the engine's SamplingParams (and the prompt-length checks OpenAI clients expect)."""

from __future__ import annotations

import dataclasses

from backend.core.errors import RequestError
from backend.core.sampling import MAX_SEED, SAMPLING_CHECK, SamplingParams
from backend.server.errors import APIError, bad_request
from backend.server.protocol import ChatCompletionRequest, CompletionRequest, _Sampling

# SamplingParams field -> the API parameter to name in a 400
_API_NAMES = {"max_new_tokens": "max_tokens", "logprobs": "logprobs", "prompt_logprobs": "logprobs"}


def context_error(
    prompt_len: int, max_model_len: int, requested: int | None = None, param: str = "messages"
) -> APIError:
    if requested is None:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{prompt_len} tokens (the prompt plus at least one new token must fit). Please reduce the length "
            "of the prompt."
        )
    else:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the completion). "
            "Please reduce the length of the prompt or the completion."
        )
    return APIError(400, message, param, "context_length_exceeded")


def max_new_tokens(
    requested: int | None, param: str, prompt_len: int, max_model_len: int, default: int, prompt_param: str
) -> int:
    """The tokens to generate: `requested`, or `default` capped to the room the context leaves."""
    room = max_model_len - prompt_len
    if room < 1:
        raise context_error(prompt_len, max_model_len, param=prompt_param)
    if requested is None:
        return min(room, default)
    if requested < 1:
        raise bad_request(f"{param} must be at least 1, got {requested}", param, "invalid_value")
    if requested > room:
        raise context_error(prompt_len, max_model_len, requested, param)
    return requested


def field_error(e: RequestError) -> APIError:
    """A SamplingParams field's RequestError as a 400 naming the API parameter (from `e.param`, never the message)."""
    return bad_request(str(e), _API_NAMES.get(e.param, e.param), "invalid_value")


def check_field(name: str, value, api_param: str | None = None) -> None:
    """SamplingParams' own check of field `name` (backend/core/sampling.py SAMPLING_CHECKS) on an API value; a 400
    naming `api_param` (default: the field's API name)."""
    check = SAMPLING_CHECK[name]
    if not check.ok(value):
        param = api_param or _API_NAMES.get(name, name)
        raise bad_request(f"{param} must be {check.allowed}, got {value!r:.80}", param, "invalid_value")


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index` of a seeded request samples with seed + index: the choices differ and repeat."""
    if seed is None:
        return None
    check_field("seed", seed)
    return (seed + index) % (MAX_SEED + 1)


def check_unsupported(req: _Sampling, max_n: int) -> None:
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")
    if not 1 <= req.n <= max_n:
        raise bad_request(f"n must be an integer in [1, {max_n}], got {req.n}", "n", "invalid_value")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options", "invalid_value")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise bad_request("suffix is not supported by this server", "suffix", "unsupported_parameter")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request(
                "best_of other than n is not supported by this server", "best_of", "unsupported_parameter"
            )
        check_field("logprobs", req.logprobs)
    if isinstance(req, ChatCompletionRequest):
        if req.tools and req.tool_choice != "none":
            raise bad_request(
                "tools (function calling) are not supported by this server", "tools", "unsupported_parameter"
            )
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise bad_request(
                f"response_format {fmt!r} is not supported by this server (only 'text')",
                "response_format",
                "unsupported_parameter",
            )
        if req.top_logprobs is not None:
            check_field("logprobs", req.top_logprobs, "top_logprobs")  # the chosen token's top-n
            if not req.logprobs:
                raise bad_request("top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")


def sampling_params(
    req: _Sampling, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
) -> SamplingParams:
    """The request's sampling settings (seed of choice 0; `with_seed` gives the others). Bad values: a 400."""
    top_k = req.top_k if req.top_k is not None else 0
    options = dict(
        max_new_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=0 if top_k == -1 else top_k,  # -1 = off, as vLLM / SGLang
        top_p=1.0 if req.top_p is None else req.top_p,
        min_p=0.0 if req.min_p is None else req.min_p,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
        frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
        seed=choice_seed(req.seed, 0),
        stop=() if req.stop is None else req.stop,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )
    try:
        return SamplingParams(**options)
    except RequestError as e:
        raise field_error(e) from None


def with_seed(params: SamplingParams, seed: int | None, index: int) -> SamplingParams:
    return params if seed is None or index == 0 else dataclasses.replace(params, seed=choice_seed(seed, index))
