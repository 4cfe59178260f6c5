"""One request's state as it moves through the scheduler."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from backend.core.sampling import SamplingParams
from backend.multimodal.inputs import ImageInputs


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache (last admission)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix hashes of the leading full, computed blocks
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None  # "length" | "stop" | "abort" | "error"
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    text: str = ""  # detokenized output so far (set by the engine)
    owner: str | None = None  # who asked (fair scheduling across owners); None = anonymous
    cache_salt: str | None = None  # enters the first block's hash: only requests with the same salt share blocks
    error: str | None = None
    images: ImageInputs | None = None  # an image-text request's images (backend/multimodal/inputs.py)

    @property
    def prefix_salt(self) -> str | None:
        """What enters the first KV block's hash: the request's cache_salt and, for an image-text request, a hash of
        its images' pixels (requests with the same token ids and different images share no blocks)."""
        if self.images is None:
            return self.cache_salt
        return f"{self.cache_salt or ''}\x00images:{self.images.content_hash}"

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time
