"""SamplingParams (validated per request) and the batched sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from backend.errors import RequestError

MAX_LOGPROBS = 20


def _valid_top_n(n) -> bool:
    return n is None or (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_LOGPROBS)


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers' semantics: over prompt and generated tokens
    seed: int | None = None  # same seed, same output (independent of the rest of the batch)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = no logprobs; 0 = chosen token only; n = also the top-n
    prompt_logprobs: int | None = None  # None = off; 0 = each prompt token given its prefix; n = also the top-n
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (
                isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
                "max_new_tokens must be an integer >= 1",
            ),
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
            (_valid_top_n(self.logprobs), "logprobs must be None or an integer 0..20"),
            (_valid_top_n(self.prompt_logprobs), "prompt_logprobs must be None or an integer 0..20"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids must be non-negative ints",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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


def _apply_repetition_penalty(logits: torch.Tensor, history: list[list[int]], penalties: list[float]) -> torch.Tensor:
    for row, (tokens, penalty) in enumerate(zip(history, penalties)):
        if penalty == 1.0 or not tokens:
            continue
        idx = torch.tensor(tokens, device=logits.device, dtype=torch.long)
        scores = logits[row, idx]
        logits[row, idx] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


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
    history: list[list[int]],  # prompt + generated tokens per row (for repetition penalty)
) -> SampleOutput:
    logits = logits.float()
    want_logprobs = any(p.logprobs is not None for p in params)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    if any(p.repetition_penalty != 1.0 for p in params):
        logits = _apply_repetition_penalty(logits.clone(), history, [p.repetition_penalty for p in params])
    chosen = logits.max(dim=-1).indices  # (B,) first maximum, like argmax (3x faster on CPU at 16 x 49152)
    for row, p in enumerate(params):
        if p.greedy:
            continue
        row_logits = _filter(logits[row] / p.temperature, p)
        probs = torch.softmax(row_logits, dim=-1)
        chosen[row] = torch.multinomial(probs, 1, generator=generators[row])[0]
    token_ids = chosen.tolist()
    if raw_logprobs is None:
        return SampleOutput(token_ids, None, None)
    chosen_lp = raw_logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
    tops = [_top(raw_logprobs[row : row + 1], p.logprobs)[0] if p.logprobs else None for row, p in enumerate(params)]
    return SampleOutput(token_ids, chosen_lp, tops)
