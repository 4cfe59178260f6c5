"""SamplingParams (validated per request) and the batched sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from backend.checks import is_int, is_real
from backend.errors import RequestError

MAX_LOGPROBS = 20


MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 1e-5  # below this a temperature is greedy (dividing by it overflows fp32 logits)


def _valid_top_n(n) -> bool:
    return n is None or (is_int(n) and 0 <= n <= MAX_LOGPROBS)


def _strings(value, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"{name} must be a string or a list of strings, got {type(value).__name__}", param=name)
    for s in value:
        if not isinstance(s, str) or not s:
            raise RequestError(f"{name} must be non-empty strings, got {s!r}", param=name)
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"{name} {s!r} is not valid Unicode (a lone surrogate)", param=name) from None
    return tuple(value)


def _token_ids(value, name: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(is_int(t) and t >= 0 for t in value):
        raise RequestError(f"{name} must be a list of non-negative integers, got {value!r:.80}", param=name)
    return tuple(value)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and stops. Validated when built and frozen afterwards (`dataclasses.replace`
    builds a changed, validated copy). Every bad value raises RequestError naming the value."""

    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy; below MIN_TEMPERATURE counts as greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers' semantics: over prompt and generated tokens
    presence_penalty: float = 0.0  # OpenAI's: minus this from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often the token was generated so far
    seed: int | None = None  # same seed, same output (independent of the rest of the batch)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = no logprobs; 0 = chosen token only; n = also the top-n
    prompt_logprobs: int | None = None  # None = off; 0 = each prompt token given its prefix; n = also the top-n
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "stop", _strings(self.stop, "stop"))
        set_(self, "stop_token_ids", _token_ids(self.stop_token_ids, "stop_token_ids"))
        checks = [
            (is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1"),
            (is_real(self.temperature) and self.temperature >= 0, "temperature must be a number >= 0 (0 = greedy)"),
            (is_int(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (is_real(self.top_p) and 0 < self.top_p <= 1, "top_p must be a number in (0, 1]"),
            (is_real(self.min_p) and 0 <= self.min_p < 1, "min_p must be a number in [0, 1)"),
            (
                is_real(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 100,
                "repetition_penalty must be a number in [0.01, 100] (1 = off)",
            ),
            (
                is_real(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                "presence_penalty must be in [-2, 2]",
            ),
            (
                is_real(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                "frequency_penalty must be in [-2, 2]",
            ),
            (
                self.seed is None or (is_int(self.seed) and 0 <= self.seed <= MAX_SEED),
                "seed must be None or an integer in [0, 2**63)",
            ),
            (isinstance(self.ignore_eos, bool), "ignore_eos must be True or False"),
            (isinstance(self.skip_special_tokens, bool), "skip_special_tokens must be True or False"),
            (_valid_top_n(self.logprobs), "logprobs must be None or an integer 0..20"),
            (_valid_top_n(self.prompt_logprobs), "prompt_logprobs must be None or an integer 0..20"),
        ]
        for ok, message in checks:
            if not ok:
                field_name = message.split()[0]
                raise RequestError(f"{message}, got {getattr(self, field_name)!r:.80}", param=field_name)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


TopLogprobs = list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class PromptLogprobs:
    """Logprobs of consecutive prompt tokens scored in one step (a prefill may take several steps)."""

    start: int  # prompt index of the first scored token (>= 1: token 0 has no prefix)
    logprobs: list[float]
    top_logprobs: list[TopLogprobs] | None  # when prompt_logprobs > 0


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float] | None  # logprob of each chosen token (None when no row asked)
    top_logprobs: list[TopLogprobs | None] | None
    prompt_logprobs: dict[int, PromptLogprobs] = field(default_factory=dict)  # by seq_id
    errors: dict[int, str] = field(default_factory=dict)  # by row: that row's request failed (the cause)


def _top(logprobs: torch.Tensor, n: int) -> list[TopLogprobs]:  # (N, V) -> N lists of n (id, logprob)
    values, ids = torch.topk(logprobs, n, dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def score_prompt(logits: torch.Tensor, targets: list[int], start: int, top_n: int) -> PromptLogprobs:
    """Row i of `logits` (N, V) predicts prompt token `start + i`, whose id is targets[i]: its raw logprob
    (fp32 log_softmax, no temperature or penalties) and, when top_n > 0, the top_n alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    index = torch.tensor(targets, dtype=torch.long, device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, index).squeeze(1).tolist()
    return PromptLogprobs(start, chosen, _top(logprobs, top_n) if top_n else None)


def _apply_penalties(
    logits: torch.Tensor,  # (B, V), changed in place
    params: list[SamplingParams],
    prompts: list[list[int]],
    outputs: list[list[int]],
) -> torch.Tensor:
    for row, (p, prompt, output) in enumerate(zip(params, prompts, outputs)):
        if p.repetition_penalty != 1.0 and (prompt or output):
            idx = torch.tensor(prompt + output, device=logits.device, dtype=torch.long)
            scores = logits[row, idx]
            logits[row, idx] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and output:
            ids, counts = torch.tensor(output, device=logits.device, dtype=torch.long).unique(return_counts=True)
            logits[row, ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    return logits


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row of (penalized) logits (V,). Numerically safe for every valid SamplingParams:
    where the scaled distribution is not finite (an extreme temperature or penalty), the row is greedy."""
    scaled = _filter(logits / p.temperature, p)
    probs = torch.softmax(scaled, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(torch.nan_to_num(logits, nan=float("-inf")).argmax())
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:  # (V,) -> (V,) with -inf where cut
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,  # (B, V) float
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    prompts: list[list[int]] | None = None,  # per row, for the penalties (None when no row is penalized)
    outputs: list[list[int]] | None = None,
) -> SampleOutput:
    """One token per row. A row whose sampling raises gets an entry in `errors` (by row) instead of failing
    the batch: the engine fails that request alone."""
    logits = logits.float()
    errors: dict[int, str] = {}
    want_logprobs = any(p.logprobs is not None for p in params)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    if any(p.penalized for p in params):
        logits = _apply_penalties(logits.clone(), params, prompts, outputs)
    chosen = logits.max(dim=-1).indices  # (B,) first maximum, like argmax (3x faster on CPU at 16 x 49152)
    for row, p in enumerate(params):
        if p.greedy:
            continue
        try:
            chosen[row] = _sample_row(logits[row], p, generators[row])
        except Exception as e:  # this row's request fails alone
            errors[row] = f"sampling failed: {type(e).__name__}: {e}"
    token_ids = chosen.tolist()
    if raw_logprobs is None:
        return SampleOutput(token_ids, None, None, errors=errors)
    chosen_lp = raw_logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
    tops = [_top(raw_logprobs[row : row + 1], p.logprobs)[0] if p.logprobs else None for row, p in enumerate(params)]
    return SampleOutput(token_ids, chosen_lp, tops, errors=errors)
