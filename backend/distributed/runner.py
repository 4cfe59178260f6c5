"""DistributedRunner: the engine's ModelRunner (same `run(batch) -> SampleOutput`) for a tensor-parallel group.

Rank 0 builds the step's ForwardBatch as usual; before its own shard runs, the batch's metadata goes to the
workers (once per step), and every rank runs the same batch on its shard. The LM head's logits are gathered on
rank 0, which samples exactly as the single-device runner does. A forward that fails (a worker died, a
collective timed out) raises TensorParallelError and shuts the group down, so the engine fails the batch's
requests and every later step fails at once with the same reason.
"""

from __future__ import annotations

import torch
from torch import nn

from backend.core.runner import ModelRunner
from backend.distributed.group import TensorParallelGroup


class _Driver:
    """Rank 0's model with the step's broadcast in front of it."""

    def __init__(self, model: nn.Module, group: TensorParallelGroup) -> None:
        self.inner = model
        self.group = group

    def __call__(self, fb) -> torch.Tensor:  # -> (R, V) on rank 0
        self.group.post_step(fb)
        try:
            return self.inner(fb)
        except Exception as e:
            raise self.group.step_failed(e) from e


class DistributedRunner(ModelRunner):
    """Built like ModelRunner (model, kv_cache, device, and the attention settings), plus the group. Allocates
    the workers' KV caches (rank 0's layout and block count). `owns_group`: close() shuts the group down (an
    engine's own group) instead of only unloading the model (a group shared by several engines, e.g. tests).
    Setting `model = None` (what Engine.close does) closes it too."""

    def __init__(self, group: TensorParallelGroup, *args, owns_group: bool = True, **kwargs) -> None:
        self.group = group
        self.owns_group = owns_group
        self._driver: _Driver | None = None
        super().__init__(*args, **kwargs)
        group.allocate_kv(self.kv_cache)

    @property
    def model(self) -> _Driver | None:
        return self._driver

    @model.setter
    def model(self, value: nn.Module | None) -> None:
        if value is None:
            if self._driver is not None:
                self.close()
            self._driver = None
        else:
            self._driver = _Driver(value, self.group)

    def close(self) -> None:
        """Release the workers' model and caches (and the group when this runner owns it)."""
        if self.owns_group:
            self.group.shutdown()
        else:
            self.group.unload()

    def take_comm_seconds(self) -> tuple[float, int]:
        """Rank 0's time inside collectives (and waiting there for the slowest rank) since the last call."""
        return self.group.ctx.take_comm_seconds()

    def describe(self) -> dict:
        """The layout: tp_size, backend, and per rank its device, weight bytes, heads and vocabulary rows."""
        return self.group.describe()
