"""Random paged batches for the kernel tests: ragged sequences with a prefix already in a shuffled cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    q: torch.Tensor  # (T, Hq, D)
    k_cache: torch.Tensor  # (NB, BS, Hkv, D)
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor  # (S+1,) int32
    seq_lens: torch.Tensor  # (S,) int32
    block_tables: torch.Tensor  # (S, MB) int32
    slot_mapping: torch.Tensor  # (T,) int64, slots of the new tokens

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max())

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.query_start_loc, self.seq_lens, self.block_tables)

    def to(self, device: torch.device) -> "PagedBatch":
        return PagedBatch(
            *(
                t.to(device)
                for t in (
                    self.q,
                    self.k_cache,
                    self.v_cache,
                    self.query_start_loc,
                    self.seq_lens,
                    self.block_tables,
                    self.slot_mapping,
                )
            )
        )


def seeded_randn(*shape: int, seed: int) -> torch.Tensor:
    """Seeded normal values generated on the CPU (the same on every machine), on the test's device."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), device="cpu").to(
        torch.get_default_device()
    )


def make_paged_batch(
    new_lens: list[int],  # new tokens per sequence (1 = decode)
    cached_lens: list[int],  # tokens already in the cache per sequence
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    spare_blocks: int = 3,
) -> PagedBatch:
    """Blocks are a random permutation of the pool (so tables are not the identity); the cache is
    filled everywhere with random values, the new tokens' K/V included (as if already stored). Generated on
    the CPU, returned on the test's default device (CUDA for the kernel tests where there is one)."""
    device = torch.get_default_device()
    with torch.device("cpu"):
        return _make_paged_batch(
            new_lens, cached_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed, spare_blocks
        ).to(device)


def _make_paged_batch(
    new_lens, cached_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed, spare_blocks
) -> PagedBatch:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(cached_lens, new_lens)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq)
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        tables[i, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(sum(new_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(new_lens).cumsum(0).tolist(), dtype=torch.int32)
    slots = []
    for i, (c, n) in enumerate(zip(cached_lens, new_lens)):
        for pos in range(c, c + n):
            slots.append(int(tables[i, pos // block_size]) * block_size + pos % block_size)
    return PagedBatch(
        q,
        k_cache,
        v_cache,
        qsl,
        torch.tensor(seq_lens, dtype=torch.int32),
        tables,
        torch.tensor(slots, dtype=torch.int64),
    )


def reference_attention(batch: PagedBatch, scale: float, **kw) -> torch.Tensor:  # (T, Hq, D) fp32
    """The torch reference on fp32 copies of the same (possibly 16-bit) inputs."""
    from flab_kernels.attention_torch import paged_attention_torch

    sinks = kw.pop("sinks", None)
    return paged_attention_torch(
        batch.q.float(),
        batch.k_cache.float(),
        batch.v_cache.float(),
        batch.query_start_loc,
        batch.seq_lens,
        batch.block_tables,
        scale,
        sinks=None if sinks is None else sinks.float(),
        **kw,
    )


# Tolerances against the fp32 reference on the same inputs.
#  fp32: only the summation order differs (online softmax over tiles vs one softmax) -> ~1e-6.
#  fp16: the kernel rounds the probabilities to fp16 before the P@V dot (rel. 2^-11 each) and
#        rounds the output to fp16 (half an ulp, 2^-11 relative) -> ~1e-3 on O(1) outputs.
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3}
