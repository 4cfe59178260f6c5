"""ForwardBatch: the tensors of one step, built once and read by every attention layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from backend.core.kv_cache import KVCache
from backend.core.scheduler import ScheduledBatch
from backend.multimodal.step import step_bidirectional_spans, step_embeddings, step_mrope_positions
from flab_kernels.attention_args import BidirectionalSpan, PagedAttentionArgs


class AttentionBackend(Protocol):
    """What a step needs of the engine's attention backend (the registry: backend/layers/attention_backends.py)."""

    def prepare(
        self, query_start_loc: list[int], seq_lens: list[int], block_tables: torch.Tensor, block_size: int
    ) -> object | None: ...

    def store(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
    ) -> None: ...

    def attend(self, args: PagedAttentionArgs, metadata: object | None) -> torch.Tensor: ...


@dataclass
class PromptRows:
    """Consecutive logits rows of one sequence that score its prompt: row `first_row + i` is at token position
    `first_pos + i` and predicts prompt token `first_pos + i + 1`."""

    seq_index: int  # in the scheduled batch
    first_row: int
    first_pos: int
    count: int


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # (T,) int64, all new tokens of all sequences, concatenated
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64
    block_tables: torch.Tensor  # (S, max_blocks) int32
    seq_lens: torch.Tensor  # (S,) int32, cached + new
    query_start_loc: torch.Tensor  # (S + 1,) int32
    logits_indices: torch.Tensor  # (R,) int64, token index of each row whose logits the model computes
    max_query_len: int
    max_seq_len: int
    kv_cache: KVCache
    attention: AttentionBackend  # the engine's attention backend (backend/layers/attention_backends.py)
    attn_metadata: object | None  # what the backend prepared for this step (the torch plan of block gathers)
    # Rows beyond one per sampling sequence exist only for requests that want prompt logprobs:
    sample_rows: torch.Tensor | None = None  # (S',) the rows that are sampled; None = every row
    prompt_rows: list[PromptRows] = field(default_factory=list)
    # Attention calls made so far in this forward, per module that calls more than once (its KV slot each time):
    attention_calls: dict[int, int] = field(default_factory=dict)
    # Image-text requests (backend/multimodal/step.py): feature rows replacing the embeddings of image tokens
    embed_rows: torch.Tensor | None = None  # (K,) int64 token indices in the step
    embed_values: torch.Tensor | None = None  # (K, H)
    mrope_positions: torch.Tensor | None = None  # (3, T) int64, M-RoPE positions (Qwen-VL family)
    bidirectional: tuple[BidirectionalSpan, ...] = ()  # spans whose tokens attend both ways (Gemma 3's images)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def build_forward_batch(
    batch: ScheduledBatch,
    kv_cache: KVCache,
    device: torch.device,
    attention: AttentionBackend,
) -> ForwardBatch:
    block_size = kv_cache.spec.block_size
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    seq_lens: list[int] = []
    qsl = [0]
    logits_indices: list[int] = []
    sample_rows: list[int] = []
    prompt_rows: list[PromptRows] = []
    for i, (seq, n, sample) in enumerate(zip(batch.seqs, batch.num_new_tokens, batch.sample)):
        start = seq.num_computed_tokens
        tokens = seq.all_token_ids[start : start + n]
        input_ids.extend(tokens)
        table = seq.block_table
        for pos in range(start, start + n):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        seq_lens.append(start + n)
        qsl.append(qsl[-1] + n)
        scored = prompt_positions_to_score(seq.params.prompt_logprobs, len(seq.prompt_token_ids), start, n)
        if scored:
            prompt_rows.append(PromptRows(i, len(logits_indices), start, scored))
            logits_indices.extend(range(qsl[-2], qsl[-2] + scored))
        if sample:
            sample_rows.append(len(logits_indices))
            logits_indices.append(qsl[-1] - 1)
    max_blocks = max(len(s.block_table) for s in batch.seqs)
    tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in batch.seqs]

    def t(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    block_tables = t(tables, torch.int32)
    embeds = step_embeddings(batch.seqs, batch.num_new_tokens)  # image tokens of this step: (rows, feature rows)
    mrope = step_mrope_positions(batch.seqs, batch.num_new_tokens)
    metadata = attention.prepare(qsl, seq_lens, block_tables, block_size)
    return ForwardBatch(
        input_ids=t(input_ids, torch.long),
        positions=t(positions, torch.long),
        slot_mapping=t(slots, torch.long),
        block_tables=block_tables,
        seq_lens=t(seq_lens, torch.int32),
        query_start_loc=t(qsl, torch.int32),
        logits_indices=t(logits_indices, torch.long),
        max_query_len=max(batch.num_new_tokens),
        max_seq_len=max(seq_lens),
        kv_cache=kv_cache,
        attention=attention,
        attn_metadata=metadata,
        sample_rows=t(sample_rows, torch.long) if prompt_rows else None,
        prompt_rows=prompt_rows,
        embed_rows=None if embeds is None else t(embeds[0], torch.long),
        embed_values=None if embeds is None else torch.cat(embeds[1]).to(device),
        mrope_positions=None if mrope is None else mrope.to(device),
        bidirectional=step_bidirectional_spans(batch.seqs, batch.num_new_tokens),
    )


def prompt_positions_to_score(prompt_logprobs: int | None, prompt_len: int, start: int, n: int) -> int:
    """How many of the step's positions start..start+n-1 predict a prompt token (when prompt logprobs are asked)."""
    if prompt_logprobs is None:
        return 0
    return max(0, min(start + n, prompt_len - 1) - start)
