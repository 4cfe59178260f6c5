"""What a sharded layer does besides its own product: sum partial outputs (row parallel), slice a replicated
input, gather column-parallel outputs, gather the vocab-parallel logits on rank 0; and the vocab-parallel
embedding. Hooks are forward hooks on the (already sliced) modules, so the module tree keeps its names and
attributes; they are recorded per module path and installed after any CPU-linear swap (which replaces modules)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backend.distributed.comm import TPContext


@dataclass
class ReduceOutput:
    """Row parallel: every rank computed a partial sum over its input features; add them up, then the bias once."""

    ctx: TPContext
    bias: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        out = self.ctx.all_reduce(output)
        return out if self.bias is None else out + self.bias


@dataclass
class SplitInput:
    """Row parallel on a replicated input (`rowwise_split_input`): keep this rank's input features."""

    start: int
    end: int

    def __call__(self, module: nn.Module, args):
        return (args[0][..., self.start : self.end],) + tuple(args[1:])


@dataclass
class GatherOutput:
    """Column parallel with a replicated output (`colwise_gather_output`): every rank gets all output features."""

    ctx: TPContext

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_gather_last_dim(output)


@dataclass
class GatherLogits:
    """The vocab-parallel LM head: rank 0 (the sampler) gets the full logits; the others keep their shard."""

    ctx: TPContext
    vocab_size: int

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return self.ctx.gather_last_dim(output, self.vocab_size)


@dataclass
class ShardHook:
    path: str  # module path in the model
    hook: object
    pre: bool = False  # a forward pre-hook (input) instead of a forward hook (output)


def install_hooks(model: nn.Module, hooks: list[ShardHook]) -> None:
    for h in hooks:
        module = model.get_submodule(h.path)
        if h.pre:
            module.register_forward_pre_hook(h.hook)
        else:
            module.register_forward_hook(h.hook)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the embedding table; other ids give zeros here, and the sum over ranks is the
    full lookup. `weight` is a parameter, so a tied LM head can share it."""

    def __init__(self, weight: nn.Parameter, start: int, vocab_size: int, ctx: TPContext, padding_idx=None) -> None:
        super().__init__()
        self.weight = weight  # (n, H)
        self.start, self.num_embeddings, self.ctx = start, vocab_size, ctx
        self.embedding_dim = weight.shape[1]
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., H)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.ctx.all_reduce(out.masked_fill(outside[..., None], 0))

    def extra_repr(self) -> str:
        rows = f"{self.start}..{self.start + self.weight.shape[0]}"
        return f"rows {rows} of {self.num_embeddings}, dim={self.embedding_dim}, rank={self.ctx.rank}"
