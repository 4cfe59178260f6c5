"""Paged KV cache: the block allocator (reference counts + hash-chained prefix caching) and the cache tensors."""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from backend.core.errors import KVCacheError

BlockHash = bytes  # 16 bytes of BLAKE2b over the parent's hash (or the cache salt) and the block's tokens


@dataclass(frozen=True)
class BlockKey:
    """What a cached block holds, compared on every prefix-cache hit (a hash alone could collide): its tokens,
    after the prefix whose last block hashed to `parent` (None: the first block, which carries the salt)."""

    parent: BlockHash | None
    salt: str | None
    tokens: tuple[int, ...]


def hash_block(key: BlockKey) -> BlockHash:
    h = hashlib.blake2b(digest_size=16)
    if key.parent is None:  # the first block: the salt (if any) enters its hash, and so every later one
        salt = b"" if key.salt is None else key.salt.encode("utf-8")
        h.update((b"\x00" if key.salt is None else b"\x01") + len(salt).to_bytes(8, "little") + salt)
    else:
        h.update(b"\x02" + key.parent)
    h.update(array("q", key.tokens).tobytes())
    return h.digest()


def block_keys(
    token_ids: list[int], block_size: int, start_block: int = 0, prev: BlockHash | None = None, salt: str | None = None
) -> list[tuple[BlockHash, BlockKey]]:
    """The hash chain over the full blocks of `token_ids` from `start_block` on (`prev`: the hash of the block
    before it): each hash covers the whole prefix and the salt; each key is what a hit must hold."""
    out = []
    for b in range(start_block, len(token_ids) // block_size):
        key = BlockKey(prev, salt if prev is None else None, tuple(token_ids[b * block_size : (b + 1) * block_size]))
        prev = hash_block(key)
        out.append((prev, key))
    return out


def block_hashes(
    token_ids: list[int], block_size: int, start_block: int = 0, prev: BlockHash | None = None, salt: str | None = None
) -> list[BlockHash]:
    return [h for h, _ in block_keys(token_ids, block_size, start_block, prev, salt)]


class BlockAllocator:
    """Hands out cache blocks. A block is free when no sequence references it; a free block keeps its
    prefix hash and key (and content) until it is reused, so a later request with the same prefix can take it
    back (least recently freed blocks are reused first). A hit is taken only when the cached block's key (its
    tokens, its parent's hash, the salt) equals the one asked for: a hash collision is a miss, never another
    prompt's KV."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.block_key: list[BlockKey | None] = [None] * num_blocks
        self.hash_to_block: dict[BlockHash, int] = {}
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_hits = 0  # blocks served from the prefix cache (cumulative)
        self.prefix_queries = 0  # blocks looked up in the prefix cache (cumulative)
        self.prefix_collisions = 0  # lookups whose hash matched a block holding other tokens (cumulative)

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
                self.block_key[block] = None
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

    def match_prefix(self, token_ids: list[int], salt: str | None = None) -> tuple[list[int], list[BlockHash]]:
        """Take a reference on the cached blocks of the longest cached prefix of the full blocks of `token_ids`
        (each hit verified against the block's key) -> (those blocks, their hashes)."""
        if not self.enable_prefix_caching:
            return [], []
        keys = block_keys(token_ids, self.block_size, salt=salt)
        self.prefix_queries += len(keys)
        blocks, hashes = [], []
        for h, key in keys:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            if self.block_key[block] != key:  # a hash collision: another prompt's block
                self.prefix_collisions += 1
                break
            if self.ref_count[block] == 0:
                del self.free_blocks[block]
            self.ref_count[block] += 1
            blocks.append(block)
            hashes.append(h)
        self.prefix_hits += len(blocks)
        return blocks, hashes

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a published prefix."""
        return sum(1 for b in self.free_blocks if self.block_hash[b] is not None)

    def reset_prefix_cache(self) -> None:
        """Forget every published prefix (blocks in use keep their content; nothing is freed)."""
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks
        self.block_key = [None] * self.num_blocks

    def register(self, block: int, h: BlockHash, key: BlockKey) -> None:
        """Publish a full, computed block under its prefix hash and key (first writer wins)."""
        if self.enable_prefix_caching and h not in self.hash_to_block and self.block_hash[block] is None:
            self.hash_to_block[h] = block
            self.block_hash[block] = h
            self.block_key[block] = key

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


@dataclass(frozen=True)
class KVSlot:
    """The cache of one attention call: K is (num_kv_heads, k_head_dim) per token, V (num_kv_heads, v_head_dim).

    Usually one per decoder layer; a layer that calls attention twice per forward (DiffLlama) has two."""

    layer: int  # decoder layer the call belongs to
    num_kv_heads: int
    k_head_dim: int
    v_head_dim: int

    @property
    def elements_per_token(self) -> int:
        return self.num_kv_heads * (self.k_head_dim + self.v_head_dim)

    def padded(self) -> "KVSlot":
        """The same slot with K and V stored at one head size (the larger): the Triton kernels need one."""
        d = max(self.k_head_dim, self.v_head_dim)
        return KVSlot(self.layer, self.num_kv_heads, d, d)


@dataclass(frozen=True)
class KVCacheSpec:
    """The cache layout: one `KVSlot` per attention call of a forward, in call order."""

    slots: tuple[KVSlot, ...]
    dtype: torch.dtype
    block_size: int

    @classmethod
    def uniform(
        cls, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int
    ) -> "KVCacheSpec":
        """One slot per layer, every layer alike (native models)."""
        return cls(tuple(KVSlot(i, num_kv_heads, head_dim, head_dim) for i in range(num_layers)), dtype, block_size)

    def bytes_per_token(self) -> int:
        """KV cache bytes one token takes, over every slot (K and V). The one place this is computed."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return sum(s.elements_per_token for s in self.slots) * elem

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token() * self.block_size

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def num_layers(self) -> int:
        """Decoder layers that have a cache (a layer with two attention calls counts once)."""
        return len({s.layer for s in self.slots})

    @property
    def uniform_shape(self) -> tuple[int, int] | None:
        """(kv heads, head dim) when every slot has that shape with K and V alike, else None."""
        shapes = {(s.num_kv_heads, s.k_head_dim, s.v_head_dim) for s in self.slots}
        if len(shapes) != 1:
            return None
        heads, k, v = shapes.pop()
        return (heads, k) if k == v else None

    @property
    def num_kv_heads(self) -> int | list[int]:
        """The kv heads of every slot: one number when they agree, else the list per slot."""
        heads = [s.num_kv_heads for s in self.slots]
        return heads[0] if len(set(heads)) == 1 else heads

    @property
    def head_dim(self) -> int | list[list[int]]:
        """One number when K and V of every slot have it, else [K head dim, V head dim] per slot."""
        shape = self.uniform_shape
        return shape[1] if shape is not None else [[s.k_head_dim, s.v_head_dim] for s in self.slots]

    def describe(self) -> dict:
        """A JSON-serialisable summary: bytes per token, and the per-slot shapes when they differ."""
        info: dict = dict(
            layers=self.num_layers,
            slots=self.num_slots,
            bytes_per_token=self.bytes_per_token(),
            dtype=str(self.dtype).removeprefix("torch."),
            kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
        )
        if self.uniform_shape is None:
            info["slot_shapes"] = [
                dict(layer=s.layer, kv_heads=s.num_kv_heads, k_head_dim=s.k_head_dim, v_head_dim=s.v_head_dim)
                for s in self.slots
            ]
        return info


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
    """Per slot a K tensor [num_blocks, block_size, num_kv_heads, k_head_dim] and a V tensor
    [num_blocks, block_size, num_kv_heads, v_head_dim] (`k[i]`, `v[i]`: slot i of `spec.slots`)."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        bs = spec.block_size
        self.k = [
            torch.zeros((num_blocks, bs, s.num_kv_heads, s.k_head_dim), dtype=spec.dtype, device=device)
            for s in spec.slots
        ]
        self.v = [
            torch.zeros((num_blocks, bs, s.num_kv_heads, s.v_head_dim), dtype=spec.dtype, device=device)
            for s in spec.slots
        ]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
