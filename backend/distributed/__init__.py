"""Tensor parallelism on torch.distributed: a group of ranks (rank 0 = the engine process) each running its
shard of the model, sharded by the model's own transformers TP plan or by the native layers' column / row
parallel rules. See group.py (processes, process group, protocol), shard.py (one rank's model), runner.py."""

from backend.distributed.errors import TensorParallelError
from backend.distributed.group import TensorParallelGroup, TPOptions
from backend.distributed.runner import DistributedRunner

__all__ = ["DistributedRunner", "TensorParallelError", "TensorParallelGroup", "TPOptions"]
