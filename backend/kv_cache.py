"""Paged KV cache: the block allocator (reference counts + hash-chained prefix caching) and the cache tensors."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from backend.errors import KVCacheError


def block_hashes(token_ids: list[int], block_size: int, start_block: int = 0, prev: int | None = None) -> list[int]:
    """Hash chain over the full blocks of `token_ids` from `start_block` on: each hash covers the whole prefix."""
    hashes = []
    for b in range(start_block, len(token_ids) // block_size):
        prev = hash((prev, tuple(token_ids[b * block_size : (b + 1) * block_size])))
        hashes.append(prev)
    return hashes


class BlockAllocator:
    """Hands out cache blocks. A block is free when no sequence references it; a free block keeps its
    prefix hash (and content) until it is reused, so a later request with the same prefix can take it
    back (least recently freed blocks are reused first)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_hits = 0  # blocks served from the prefix cache (cumulative)
        self.prefix_queries = 0  # blocks looked up in the prefix cache (cumulative)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_blocks):
            raise KVCacheError(f"asked for {n} KV blocks, {len(self.free_blocks)} free")
        blocks = []
        for _ in range(n):
            block, _ = self.free_blocks.popitem(last=False)
            old = self.block_hash[block]
            if old is not None:  # evict its cached prefix
                del self.hash_to_block[old]
                self.block_hash[block] = None
            self.ref_count[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        # Freed in reverse so the tail of a sequence is evicted before its (more shareable) head.
        for block in reversed(blocks):
            if self.ref_count[block] <= 0:
                raise RuntimeError(f"block {block} freed twice")
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free_blocks[block] = None

    def match_prefix(self, hashes: list[int]) -> list[int]:
        """Take a reference on the cached blocks of the longest cached prefix of `hashes`."""
        if not self.enable_prefix_caching:
            return []
        self.prefix_queries += len(hashes)
        blocks = []
        for h in hashes:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            if self.ref_count[block] == 0:
                del self.free_blocks[block]
            self.ref_count[block] += 1
            blocks.append(block)
        self.prefix_hits += len(blocks)
        return blocks

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a published prefix."""
        return sum(1 for b in self.free_blocks if self.block_hash[b] is not None)

    def reset_prefix_cache(self) -> None:
        """Forget every published prefix (blocks in use keep their content; nothing is freed)."""
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks

    def register(self, block: int, h: int) -> None:
        """Publish a full, computed block under its prefix hash (first writer wins)."""
        if self.enable_prefix_caching and h not in self.hash_to_block and self.block_hash[block] is None:
            self.hash_to_block[h] = block
            self.block_hash[block] = h

    def check_invariants(self, owned: list[list[int]]) -> None:
        """Every block is either free (ref 0) or referenced exactly as often as sequences hold it."""
        counts = [0] * self.num_blocks
        for table in owned:
            for b in table:
                counts[b] += 1
        if counts != self.ref_count:
            raise AssertionError("KV block reference counts do not match the sequences' block tables")
        free = set(self.free_blocks)
        if any((self.ref_count[b] == 0) != (b in free) for b in range(self.num_blocks)):
            raise AssertionError("free list disagrees with reference counts")


@dataclass
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


def plan_num_blocks(spec: KVCacheSpec, budget_bytes: int, max_model_len: int) -> int:
    num_blocks = budget_bytes // spec.bytes_per_block
    needed = math.ceil(max_model_len / spec.block_size)
    if num_blocks < needed:
        raise KVCacheError(
            f"the KV cache budget ({budget_bytes / 2**20:.1f} MiB = {num_blocks} blocks of {spec.block_size} tokens) "
            f"cannot hold one sequence of max_model_len={max_model_len} ({needed} blocks, "
            f"{needed * spec.bytes_per_block / 2**20:.1f} MiB). Raise kv_cache_memory_gb or lower max_model_len."
        )
    return num_blocks


class KVCache:
    """Per layer a K and a V tensor of shape [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
