"""Helpers for native-model tests: run a model's forward on one prompt through a hand-built ForwardBatch."""

from __future__ import annotations

import torch

from backend.forward_batch import ForwardBatch
from kernels.attention_torch import build_plan


def prefill_logits(engine, token_ids: list[int]) -> torch.Tensor:  # (L, V)
    """Logits of every position of one prompt, from the engine's model (one prefill, blocks 0..n-1)."""
    n = len(token_ids)
    block_size = engine.kv_cache.spec.block_size
    block_tables = torch.arange(-(-n // block_size), dtype=torch.int32)[None]  # (1, MB)
    qsl, seq_lens = [0, n], [n]
    batch = ForwardBatch(
        input_ids=torch.tensor(token_ids),
        positions=torch.arange(n),
        slot_mapping=torch.arange(n),
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        logits_indices=torch.arange(n),
        max_query_len=n,
        max_seq_len=n,
        kv_cache=engine.kv_cache,
        backend="torch",
        plan=build_plan(qsl, seq_lens, block_tables, block_size),
    )
    with torch.inference_mode():
        return engine.loaded.model(batch).float()
