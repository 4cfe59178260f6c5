"""A scheduler driven by hand: fake sampled tokens instead of a model."""

from __future__ import annotations

from backend.core.kv_cache import BlockAllocator
from backend.core.sampling import SamplingParams
from backend.core.scheduler import ScheduledBatch, Scheduler
from backend.core.sequence import Sequence, prefix_salt


def make_scheduler(
    num_blocks: int = 32, block_size: int = 4, max_num_seqs: int = 8, budget: int = 64, per_owner: int | None = None
) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks, block_size), max_num_seqs, budget, per_owner)


def make_seq(seq_id: int, prompt: list[int], max_new_tokens: int = 4, **kwargs) -> Sequence:
    prompt_logprobs = kwargs.pop("prompt_logprobs", None)
    if "cache_salt" in kwargs:  # as the engine composes it (backend/core/sequence.prefix_salt)
        kwargs["prefix_salt"] = prefix_salt(None, kwargs.pop("cache_salt"), None)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, prompt_logprobs=prompt_logprobs)
    return Sequence(seq_id, list(prompt), params, **kwargs)


def step(sched: Scheduler, token: int = 1) -> ScheduledBatch:
    """One engine step without a model: schedule, advance, append `token` where the step samples."""
    batch = sched.schedule()
    sched.update(batch)
    for seq, sample in zip(batch.seqs, batch.sample):
        if sample and not seq.is_finished:
            seq.output_token_ids.append(token)
            if len(seq.output_token_ids) >= seq.params.max_new_tokens:
                sched.finish(seq, "length")
    sched.allocator.check_invariants([s.block_table for s in sched.running + list(sched.waiting)])
    return batch


def run_to_end(sched: Scheduler, limit: int = 200) -> None:
    for _ in range(limit):
        if not sched.has_work():
            return
        step(sched)
    raise AssertionError("the scheduler did not finish its work")
