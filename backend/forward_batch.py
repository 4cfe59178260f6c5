"""ForwardBatch: the tensors of one step, built once and read by every attention layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.kv_cache import KVCache
from backend.scheduler import ScheduledBatch
from kernels.attention_torch import TorchAttentionPlan, build_plan


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # (T,) int64, all new tokens of all sequences, concatenated
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64
    block_tables: torch.Tensor  # (S, max_blocks) int32
    seq_lens: torch.Tensor  # (S,) int32, cached + new
    query_start_loc: torch.Tensor  # (S + 1,) int32
    logits_indices: torch.Tensor  # (R,) int64, token index of each row that is sampled
    max_query_len: int
    max_seq_len: int
    kv_cache: KVCache
    backend: str  # "torch" | "triton"
    plan: TorchAttentionPlan | None  # gather indices for the torch backend

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def build_forward_batch(batch: ScheduledBatch, kv_cache: KVCache, device: torch.device, backend: str) -> ForwardBatch:
    block_size = kv_cache.spec.block_size
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    seq_lens: list[int] = []
    qsl = [0]
    logits_indices: list[int] = []
    for seq, n, sample in zip(batch.seqs, batch.num_new_tokens, batch.sample):
        start = seq.num_computed_tokens
        tokens = seq.all_token_ids[start : start + n]
        input_ids.extend(tokens)
        table = seq.block_table
        for pos in range(start, start + n):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        seq_lens.append(start + n)
        qsl.append(qsl[-1] + n)
        if sample:
            logits_indices.append(qsl[-1] - 1)
    max_blocks = max(len(s.block_table) for s in batch.seqs)
    tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in batch.seqs]

    def t(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    block_tables = t(tables, torch.int32)
    plan = build_plan(qsl, seq_lens, block_tables, block_size) if backend == "torch" else None
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
        backend=backend,
        plan=plan,
    )
