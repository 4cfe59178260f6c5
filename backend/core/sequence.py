"""One request's state as it moves through the scheduler."""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field

import torch

from backend.core.sampling import SamplingParams
from backend.multimodal.inputs import ImageInputs


def prefix_salt(owner: str | None, cache_salt: str | None, image_hash: int | None) -> str | None:
    """The one composition of what enters a request's first KV block hash (backend/core/kv_cache.hash_block), so that
    two requests share prefix blocks only when all three agree: `owner` (given only when the engine keeps each
    owner's blocks to itself, `prefix_cache_per_owner`), the request's `cache_salt` (as vLLM's) and a hash of an
    image-text request's pixels. None when all are None (shared by every such request). The parts are encoded
    unambiguously (a JSON list), so no choice of one part can spell another combination."""
    if owner is None and cache_salt is None and image_hash is None:
        return None
    return json.dumps([owner, cache_salt, image_hash])


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
    prefix_salt: str | None = None  # enters the first block's hash (`prefix_salt()` composes it): equal salts share
    error: str | None = None
    images: ImageInputs | None = None  # an image-text request's images (backend/multimodal/inputs.py)

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
