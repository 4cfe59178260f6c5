"""Input checks of a request, before anything is queued: each raises RequestError (its `param` names the input)."""

from __future__ import annotations

from backend.core.checks import is_int
from backend.core.errors import ContextLengthError, RequestError
from backend.core.sampling import SamplingParams

PromptItem = tuple[str | None, list[int] | None]  # (text, token ids): one of the two


def check_owner(owner) -> str | None:
    if owner is not None and not isinstance(owner, str):
        raise RequestError(f"owner must be None or a string, got {type(owner).__name__}", param="owner")
    return owner


def check_params(params) -> SamplingParams:
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}", param="params")
    return params


def check_cache_salt(cache_salt) -> str | None:
    if cache_salt is not None and not isinstance(cache_salt, str):
        raise RequestError(f"cache_salt must be None or a string, got {type(cache_salt).__name__}", param="cache_salt")
    return cache_salt


def check_prompt_text(tokenizer, prompt) -> None:
    """A text prompt as add_request takes it: a non-empty string of valid Unicode, and a tokenizer to read it."""
    if not isinstance(prompt, str):
        raise RequestError(f"a prompt must be a string, got {type(prompt).__name__} {prompt!r:.60}", param="prompt")
    if not prompt:
        raise RequestError("the prompt is empty: give a non-empty string", param="prompt")
    if tokenizer is None:
        raise RequestError(
            "this engine was started without a tokenizer: give prompt_token_ids instead of text", param="prompt"
        )
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            f"the prompt is not valid Unicode (a lone surrogate at position {e.start})", param="prompt"
        ) from None


def encode_prompt(tokenizer, prompt) -> list[int]:
    """The token ids of a text prompt."""
    check_prompt_text(tokenizer, prompt)
    return tokenizer.encode(prompt)


def check_token_ids(ids, vocab_size: int, max_model_len: int) -> list[int]:
    """A prompt's token ids: a non-empty list of ids in [0, vocab_size) that leaves room for one new token."""
    param = "prompt_token_ids"
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
        raise RequestError(f"prompt_token_ids must be a list of integers, got {type(ids).__name__}", param=param)
    ids = list(ids)
    if not ids:
        raise RequestError("the prompt is empty (no tokens)", param=param)
    bad = [t for t in ids if not is_int(t) or not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"prompt token ids must be integers in [0, {vocab_size}), got {bad[0]!r:.40}", param=param)
    if len(ids) >= max_model_len:
        raise ContextLengthError(
            f"the prompt has {len(ids)} tokens; the context holds {max_model_len} "
            "(prompt plus at least one new token): shorten it",
            len(ids),
            max_model_len,
        )
    return ids


def prompt_items(prompts, prompt_token_ids) -> list[PromptItem]:
    """generate()'s prompts: text or token id lists, never both, at least one."""
    if prompts is not None and prompt_token_ids is not None:
        raise RequestError("give prompts or prompt_token_ids, not both", param="prompts")
    if prompts is not None:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise RequestError(
                f"prompts must be a string or a list of strings, got {type(prompts).__name__}", param="prompts"
            )
        items = [(p, None) for p in prompts]
    elif prompt_token_ids is not None:
        if not isinstance(prompt_token_ids, (list, tuple)) or not all(
            isinstance(ids, (list, tuple)) for ids in prompt_token_ids
        ):
            raise RequestError(
                "prompt_token_ids must be a list of token id lists, e.g. [[1, 2, 3]]", param="prompt_token_ids"
            )
        items = [(None, ids) for ids in prompt_token_ids]
    else:
        items = []
    if not items:
        raise RequestError("give prompts or prompt_token_ids", param="prompts")
    return items
