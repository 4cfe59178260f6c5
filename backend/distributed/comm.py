"""The collectives a sharded model runs, on the process group of one tensor-parallel engine.

Every rank holds a `TPContext`; the parallel layers (layers.py) call `all_reduce` / `gather_last_dim` on it.
The group is torch.distributed's default process group (gloo on CPU, NCCL on CUDA), set up by group.py /
worker.py. The context also adds up the wall time spent inside collectives (the benchmark's communication
share of a step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TPContext:
    rank: int
    world_size: int
    comm_seconds: float = 0.0  # time inside collectives since the last `take_comm_seconds`
    comm_calls: int = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place (every rank gets it)."""
        t0 = time.perf_counter()
        dist.all_reduce(x)
        self._count(t0)
        return x

    def gather_last_dim(self, x: torch.Tensor, full: int) -> torch.Tensor:
        """Rank 0 gets the ranks' `x` (..., n_r) side by side along the last dim, cut to `full` columns; the other
        ranks get their own `x` back (only rank 0 samples). Shards may differ in width (padded to the widest)."""
        width = -(-full // self.world_size)  # every rank's shard is padded to ceil(full / world)
        t0 = time.perf_counter()
        x = x.contiguous()
        padded = x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        if self.rank == 0:
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.gather(padded, parts, dst=0)
            out = torch.cat(parts, dim=-1)[..., :full]  # (..., full)
        else:
            dist.gather(padded, None, dst=0)
            out = x
        self._count(t0)
        return out

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank gets the ranks' equal-width `x` (..., n) side by side: (..., world * n)."""
        t0 = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x)
        self._count(t0)
        return torch.cat(parts, dim=-1)

    def take_comm_seconds(self) -> tuple[float, int]:
        """(seconds, calls) in collectives since the last call; resets both."""
        out = (self.comm_seconds, self.comm_calls)
        self.comm_seconds, self.comm_calls = 0.0, 0
        return out

    def _count(self, t0: float) -> None:
        self.comm_seconds += time.perf_counter() - t0
        self.comm_calls += 1
