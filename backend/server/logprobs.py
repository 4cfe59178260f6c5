"""The engine's logprobs (per token: the chosen token's logprob and the top-k (id, logprob) pairs) in the
OpenAI formats: completions' `{tokens, token_logprobs, top_logprobs, text_offset}` and chat's
`logprobs.content: [{token, logprob, bytes, top_logprobs}]`. Token strings are each token decoded alone
(special tokens written out)."""

from __future__ import annotations

import math

from backend.server.protocol import CompletionLogprobs, TokenLogprob, TopLogprob

TopList = list[tuple[int, float]]


class TokenText:
    """Decodes single tokens (cached: the same ids come back in every top-k list)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def _finite(lp: float | None) -> float | None:
    if lp is None:
        return None
    return lp if math.isfinite(lp) else -9999.0  # JSON has no -inf; OpenAI clients expect a number


def completion_logprobs(
    token_text: TokenText,
    token_ids: list[int],
    logprobs: list[float | None],
    tops: list[TopList | None] | None,
    want_top: int,
    offset: int,
    into: CompletionLogprobs | None = None,
) -> CompletionLogprobs:
    """Append the tokens to `into` (a new one when None); `offset`: the text offset of the first token."""
    out = into if into is not None else CompletionLogprobs()
    if out.text_offset:
        offset = out.text_offset[-1] + len(out.tokens[-1])
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs)):
        text = token_text(tid)
        out.tokens.append(text)
        out.token_logprobs.append(_finite(lp))
        top = tops[i] if tops is not None and i < len(tops) else None
        if lp is None:  # the prompt's first token has no prefix to score it
            out.top_logprobs.append(None)
        elif want_top and top:
            out.top_logprobs.append({token_text(t): _finite(v) for t, v in top})
        else:
            out.top_logprobs.append({text: _finite(lp)} if want_top else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _top_entry(text: str, lp: float) -> TopLogprob:
    return TopLogprob(token=text, logprob=_finite(lp), bytes=list(text.encode("utf-8", errors="replace")))


def chat_logprobs(
    token_text: TokenText, token_ids: list[int], logprobs: list[float], tops: list[TopList | None] | None
) -> list[TokenLogprob]:
    content = []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs)):
        text = token_text(tid)
        top = tops[i] if tops is not None and i < len(tops) and tops[i] else []
        content.append(
            TokenLogprob(
                token=text,
                logprob=_finite(lp),
                bytes=list(text.encode("utf-8", errors="replace")),
                top_logprobs=[_top_entry(token_text(t), v) for t, v in top],
            )
        )
    return content
