"""What the engine hands back: finished outputs and streaming deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

from backend.core.metrics import StepStats


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids only
    text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    logprobs: list[float] | None = None  # of each chosen token
    top_logprobs: list[list[tuple[int, float]] | None] | None = None
    # When SamplingParams.prompt_logprobs is set: one entry per prompt token, None for token 0 (no prefix)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None  # when prompt_logprobs > 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    ttft: float | None = None  # seconds from arrival to the first token
    latency: float | None = None  # seconds from arrival to finish
    error: str | None = None


@dataclass
class StreamDelta:
    request_id: int
    text: str  # new text since the previous delta
    token_ids: list[int]  # new tokens since the previous delta
    finished: bool
    finish_reason: str | None
    output: RequestOutput  # everything so far
    stats: StepStats | None = None  # the engine step that produced it
    extra: dict = field(default_factory=dict)
