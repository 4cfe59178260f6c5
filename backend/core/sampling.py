"""SamplingParams (validated per request) and the batched sampler."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from backend.core.checks import is_int, is_real
from backend.core.errors import RequestError

MAX_LOGPROBS = 20


MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 1e-5  # below this a temperature is greedy (dividing by it overflows fp32 logits)
TOP_P_CANDIDATES = 256  # top-p looks at this many most likely tokens first (more only when they fall short)


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
class FieldCheck:
    """One SamplingParams field's check: its name (the `param` of the error), the test, and what is allowed."""

    param: str
    ok: Callable[[object], bool]
    allowed: str  # completes "<param> must be ..."

    def apply(self, value) -> None:
        if not self.ok(value):
            raise RequestError(f"{self.param} must be {self.allowed}, got {value!r:.80}", param=self.param)


def _real_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[object], bool]:
    return lambda v: is_real(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)


# Every scalar field's check, declared once with the name its error carries (stop and stop_token_ids are normalized
# by _strings / _token_ids above). The server names the API parameter from `param`, never from the message.
SAMPLING_CHECKS: tuple[FieldCheck, ...] = (
    FieldCheck("max_new_tokens", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    FieldCheck("temperature", lambda v: is_real(v) and v >= 0, "a number >= 0 (0 = greedy)"),
    FieldCheck("top_k", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    FieldCheck("top_p", _real_in(0, 1, low_open=True), "a number in (0, 1]"),
    FieldCheck("min_p", _real_in(0, 1, high_open=True), "a number in [0, 1)"),
    FieldCheck("repetition_penalty", _real_in(0.01, 100), "a number in [0.01, 100] (1 = off)"),
    FieldCheck("presence_penalty", _real_in(-2, 2), "in [-2, 2]"),
    FieldCheck("frequency_penalty", _real_in(-2, 2), "in [-2, 2]"),
    FieldCheck("seed", lambda v: v is None or (is_int(v) and 0 <= v <= MAX_SEED), "None or an integer in [0, 2**63)"),
    FieldCheck("ignore_eos", lambda v: isinstance(v, bool), "True or False"),
    FieldCheck("skip_special_tokens", lambda v: isinstance(v, bool), "True or False"),
    FieldCheck("logprobs", _valid_top_n, f"None or an integer 0..{MAX_LOGPROBS}"),
    FieldCheck("prompt_logprobs", _valid_top_n, f"None or an integer 0..{MAX_LOGPROBS}"),
)
SAMPLING_CHECK = MappingProxyType({check.param: check for check in SAMPLING_CHECKS})  # by field name


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
        for check in SAMPLING_CHECKS:
            check.apply(getattr(self, check.param))

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
    vision_s: float = 0.0  # seconds the vision tower ran in this step (image-text requests' first prefill)


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


@dataclass(frozen=True)
class RowSettings:
    """The filters of N sampled rows as tensors, one value per row (a filter off in a row is a no-op there)."""

    temperature: torch.Tensor  # (N, 1) float32
    top_k: torch.Tensor | None  # (N, 1) long, 1-based rank of the last kept token; None when no row uses top-k
    top_k_on: torch.Tensor | None  # (N, 1) bool
    top_p: torch.Tensor | None  # (N, 1) float32; None when no row uses top-p
    min_p: torch.Tensor | None  # (N, 1) float32; None when no row uses min-p
    max_top_k: int  # the largest k any row keeps (0 when no row uses top-k)

    @classmethod
    def of(cls, params: list[SamplingParams], vocab_size: int, device: torch.device) -> "RowSettings":
        def column(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        ks = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
        use_k, use_p, use_min = any(ks), any(p.top_p < 1.0 for p in params), any(p.min_p > 0.0 for p in params)
        return cls(
            temperature=column([p.temperature for p in params]),
            top_k=column([max(k, 1) for k in ks], torch.long) if use_k else None,
            top_k_on=column([k > 0 for k in ks], torch.bool) if use_k else None,
            top_p=column([p.top_p for p in params]) if use_p else None,
            min_p=column([p.min_p for p in params]) if use_min else None,
            max_top_k=max(ks),
        )


def _apply_penalties(
    logits: torch.Tensor,  # (B, V), changed in place
    params: list[SamplingParams],
    prompts: list[list[int]],
    outputs: list[list[int]],
) -> torch.Tensor:
    """Repetition (over prompt and output), presence and frequency (over output) penalties of every penalized
    row at once: token sets and counts scattered into (R, V) tensors."""
    rows = [r for r, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[1]
    seen_ids = _padded([prompts[r] + outputs[r] for r in rows], vocab, dev)  # (R, L), vocab = padding
    out_ids = _padded([outputs[r] for r in rows], vocab, dev)  # (R, L')
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=dev).scatter_(1, seen_ids, True)[:, :vocab]
    counts = torch.zeros(len(rows), vocab + 1, device=dev)
    counts = counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=counts.dtype))[:, :vocab]  # (R, V)
    penalized = [params[r] for r in rows]
    rep = torch.tensor([p.repetition_penalty for p in penalized], device=dev)[:, None]
    presence = torch.tensor([p.presence_penalty for p in penalized], device=dev)[:, None]
    frequency = torch.tensor([p.frequency_penalty for p in penalized], device=dev)[:, None]
    index = torch.tensor(rows, device=dev)
    sub = logits[index]  # (R, V)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - (presence * (counts > 0) + frequency * counts)
    logits[index] = sub
    return logits


def _padded(lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:  # -> (N, max len or 1)
    width = max(1, max(len(x) for x in lists))
    return torch.tensor([x + [pad] * (width - len(x)) for x in lists], dtype=torch.long, device=device)


def _filter_rows(logits: torch.Tensor, s: RowSettings) -> torch.Tensor:  # (N, V) -> (N, V) with -inf where cut
    if s.top_k is not None:  # keep the k best of each row (ties with the k-th kept)
        kth = torch.topk(logits, s.max_top_k, dim=-1).values.gather(1, s.top_k - 1)  # (N, 1)
        logits = logits.masked_fill(s.top_k_on & (logits < kth), float("-inf"))
    if s.top_p is not None:
        logits = logits.masked_fill(_top_p_drop(logits, s.top_p, max(TOP_P_CANDIDATES, s.max_top_k)), float("-inf"))
    if s.min_p is not None:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < s.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def _top_p_drop(logits: torch.Tensor, top_p: torch.Tensor, k: int) -> torch.Tensor:  # (N, V) -> (N, V) bool
    """Keep, per row, the smallest set of most likely tokens whose mass reaches top_p (a token tied with the last
    kept one stays too). Looks at the k most likely tokens first and widens only when they fall short of top_p,
    so most steps avoid sorting whole rows."""
    probs = torch.softmax(logits, dim=-1)  # (N, V)
    vocab = probs.shape[-1]
    while True:
        k = min(k, vocab)
        top = torch.topk(probs, k, dim=-1).values  # (N, k), best first
        cum = top.cumsum(dim=-1)
        if k == vocab or bool(((cum[:, -1:] >= top_p) | (top_p >= 1.0)).all()):
            break
        k *= 8
    kept = (cum - top < top_p).sum(dim=-1, keepdim=True)  # (N, 1) the prefix whose mass before it is short
    threshold = top.gather(1, (kept - 1).clamp(min=0))  # (N, 1) probability of the last kept token
    return (probs < threshold) & (top_p < 1.0)


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:  # (V,) -> (V,) with -inf where cut
    return _filter_rows(logits[None], RowSettings.of([p], logits.shape[-1], logits.device))[0]


def _draw(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One uniform number in [0, 1) from the row's own generator (its seed alone decides it)."""
    if generator is None:
        return torch.rand((), device=device)
    return torch.rand((), generator=generator, device=generator.device).to(device)


def _sample_rows(
    logits: torch.Tensor,  # (N, V) float32, penalized
    s: RowSettings,
    uniforms: torch.Tensor,  # (N,) in [0, 1)
) -> torch.Tensor:  # (N,) long
    """One token per row by inverse transform over the filtered distribution, all rows in tensor ops (one host
    sync for the batch). Numerically safe for every valid SamplingParams: a row whose scaled distribution is not
    finite (an extreme temperature or penalty) is greedy."""
    probs = torch.softmax(_filter_rows(logits / s.temperature, s), dim=-1)  # (N, V)
    cdf = probs.cumsum(dim=-1)  # (N, V), non-decreasing
    total = cdf[:, -1]  # (N,) NaN or 0 where the distribution is not finite
    target = (1.0 - uniforms)[:, None] * total[:, None]  # (N, 1) in (0, total]
    picked = torch.searchsorted(cdf, target).squeeze(1).clamp(max=probs.shape[-1] - 1)  # first cdf >= target
    ok = torch.isfinite(total) & (total > 0)
    if bool(ok.all()):  # one host sync for the batch
        return picked
    greedy = torch.nan_to_num(logits, nan=float("-inf")).max(dim=-1).indices
    return torch.where(ok, picked, greedy)


def _sample_row(logits: torch.Tensor, p: SamplingParams, uniform: torch.Tensor) -> int:
    """One row (V,) alone: the fallback when the batched path raised, so that a bad row fails alone."""
    return int(_sample_rows(logits[None], RowSettings.of([p], logits.shape[-1], logits.device), uniform[None])[0])


def sample(
    logits: torch.Tensor,  # (B, V) float
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    prompts: list[list[int]] | None = None,  # per row, for the penalties (None when no row is penalized)
    outputs: list[list[int]] | None = None,
) -> SampleOutput:
    """One token per row: greedy rows by argmax, the others in one batched pass whose only per-row work is one
    random number from each row's generator (per-request seeds). A row whose sampling raises gets an entry in
    `errors` (by row) instead of failing the batch: the engine fails that request alone."""
    logits = logits.float()
    errors: dict[int, str] = {}
    want_logprobs = any(p.logprobs is not None for p in params)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    if any(p.penalized for p in params):
        logits = _apply_penalties(logits.clone(), params, prompts, outputs)
    chosen = logits.max(dim=-1).indices  # (B,) first maximum, like argmax (3x faster on CPU at 16 x 49152)
    rows, uniforms = [], []
    for row, p in enumerate(params):
        if p.greedy:
            continue
        try:
            uniforms.append(_draw(generators[row], logits.device))
            rows.append(row)
        except Exception as e:  # this row's request fails alone
            errors[row] = _failure(e)
    if rows:
        index = torch.tensor(rows, device=logits.device)
        try:
            settings = RowSettings.of([params[r] for r in rows], logits.shape[1], logits.device)
            chosen[index] = _sample_rows(logits[index], settings, torch.stack(uniforms))
        except Exception:  # find the row that raised: each row alone, a failure stays with its request
            for row, u in zip(rows, uniforms):
                try:
                    chosen[row] = _sample_row(logits[row], params[row], u)
                except Exception as e:
                    errors[row] = _failure(e)
    token_ids = chosen.tolist()
    if raw_logprobs is None:
        return SampleOutput(token_ids, None, None, errors=errors)
    chosen_lp = raw_logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
    return SampleOutput(token_ids, chosen_lp, _tops(raw_logprobs, params), errors=errors)


def _failure(e: Exception) -> str:
    return f"sampling failed: {type(e).__name__}: {e}"


def _tops(logprobs: torch.Tensor, params: list[SamplingParams]) -> list[TopLogprobs | None]:
    """The top-n alternatives of each row that asked (one topk over the batch at the largest n)."""
    n = max(p.logprobs or 0 for p in params)
    if n == 0:
        return [None] * len(params)
    best = _top(logprobs, n)
    return [best[row][: p.logprobs] if p.logprobs else None for row, p in enumerate(params)]
