"""Which slice of each dimension a rank holds: attention heads (KV heads replicated when fewer than ranks), the
vocabulary (padded shards), and evenly split feature dims. Pure arithmetic; refusals name what does not divide."""

from __future__ import annotations

from dataclasses import dataclass

from backend.core.errors import UnsupportedModelError


@dataclass(frozen=True)
class HeadShard:
    """Rank `rank`'s heads: q heads [q_start, q_start + q_count), kv heads [kv_start, kv_start + kv_count)."""

    q_start: int
    q_count: int
    kv_start: int
    kv_count: int
    kv_replicated: bool  # fewer kv heads than ranks: this kv head is also on other ranks


def head_shard(num_heads: int, num_kv_heads: int, rank: int, world: int, where: str) -> HeadShard:
    """Split q heads evenly; kv heads evenly when there are at least `world` of them, else each rank keeps the one
    kv head its q heads read (GQA groups stay whole: q head h reads kv head h // (num_heads // num_kv_heads))."""
    if num_heads % world:
        raise UnsupportedModelError(
            f"{where}: {num_heads} attention heads do not divide over tp_size={world} ranks; use a tp_size that "
            f"divides {num_heads}"
        )
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise UnsupportedModelError(f"{where}: {num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    q_count = num_heads // world
    if num_kv_heads >= world:
        if num_kv_heads % world:
            raise UnsupportedModelError(
                f"{where}: {num_kv_heads} kv heads do not divide over tp_size={world} ranks (and are more than the "
                f"ranks, so they cannot be replicated); use a tp_size that divides {num_kv_heads}"
            )
        kv_count = num_kv_heads // world
        return HeadShard(rank * q_count, q_count, rank * kv_count, kv_count, False)
    if world % num_kv_heads:
        raise UnsupportedModelError(
            f"{where}: {num_kv_heads} kv heads cannot be replicated over tp_size={world} ranks ({world} is not a "
            f"multiple of {num_kv_heads})"
        )
    return HeadShard(rank * q_count, q_count, rank // (world // num_kv_heads), 1, True)


def even_range(size: int, rank: int, world: int, where: str) -> tuple[int, int]:
    """[start, end) of an evenly split dim."""
    if size % world:
        raise UnsupportedModelError(f"{where}: size {size} does not divide over tp_size={world} ranks")
    n = size // world
    return rank * n, (rank + 1) * n


def vocab_range(vocab: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the vocabulary rows on `rank`: shards of ceil(vocab / world), the last one shorter."""
    per = -(-vocab // world)
    return min(vocab, rank * per), min(vocab, (rank + 1) * per)
