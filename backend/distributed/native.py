"""Shard a loaded native model (backend/models/llama.py and its families) in place.

Column parallel: the fused `qkv_proj` (this rank's q heads, and its kv heads: split when there are at least as
many as ranks, else the one kv head its q heads read, replicated), the fused `gate_up_proj` (the same slice of
the gate half and of the up half), MoE experts' stacked gate/up. Row parallel (partial sums added over ranks):
`o_proj`, `down_proj`, the experts' stacked down projection. Experts quantized on the fly get the same split of each
expert's quantized linears (backend/distributed/experts.py). Vocab parallel: the embedding and the LM head
(logits gathered on rank 0). Norms, routers and rotary stay whole on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from backend.distributed.comm import TPContext
from backend.distributed.experts import is_quantized_stack, shard_quantized_stack
from backend.distributed.hooks import GatherLogits, ReduceOutput, ShardHook, VocabParallelEmbedding
from backend.distributed.partition import HeadShard, even_range, head_shard, vocab_range
from backend.distributed.slicing import ranges_index, take_cols, take_rows
from backend.models.llama import MLP, Attention
from backend.models.moe import Experts, SparseMoE


def shard_native(model: nn.Module, ctx: TPContext) -> tuple[list[ShardHook], dict]:
    """Cut `model` to rank `ctx.rank`'s part; returns the hooks to install and a summary of the rank's slice."""
    opts = model.options
    name = type(model).__name__
    heads = head_shard(opts.num_heads, opts.num_kv_heads, ctx.rank, ctx.world_size, name)
    hooks: list[ShardHook] = []
    summary = _experts_summary(model, ctx)  # before the experts are cut
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        hooks += _shard_attention(layer.self_attn, heads, ctx, f"{prefix}.self_attn")
        hooks += _shard_mlp(layer.mlp, ctx, f"{prefix}.mlp")
    vocab = opts.vocab_size
    start, end = vocab_range(vocab, ctx.rank, ctx.world_size)
    embed = model.model.embed_tokens
    tied = model.lm_head.weight is embed.weight if isinstance(model.lm_head, nn.Linear) else False
    shard = nn.Parameter(embed.weight.detach()[start:end].contiguous(), requires_grad=False)
    model.model.embed_tokens = VocabParallelEmbedding(shard, start, vocab, ctx)
    rows = torch.arange(start, end, device=shard.device)
    if tied:
        model.lm_head.weight = shard
    else:
        model.lm_head = take_rows(model.lm_head, rows, f"{name}.lm_head")
    hooks.append(ShardHook("lm_head", GatherLogits(ctx, vocab)))
    model.options = opts.with_(num_heads=heads.q_count, num_kv_heads=heads.kv_count)
    summary.update(
        q_heads=[heads.q_start, heads.q_start + heads.q_count],
        kv_heads=[heads.kv_start, heads.kv_start + heads.kv_count],
        kv_heads_replicated=heads.kv_replicated,
        vocab_rows=[start, end],
    )
    return hooks, summary


def _shard_attention(attn: Attention, heads: HeadShard, ctx: TPContext, path: str) -> list[ShardHook]:
    d = attn.head_dim
    q_size, kv_size = attn.q_size, attn.kv_size
    q = (heads.q_start * d, (heads.q_start + heads.q_count) * d)
    k = (q_size + heads.kv_start * d, q_size + (heads.kv_start + heads.kv_count) * d)
    v = (k[0] + kv_size, k[1] + kv_size)
    device = _device_of(attn.qkv_proj)
    attn.qkv_proj = take_rows(attn.qkv_proj, ranges_index([q, k, v], device), f"{path}.qkv_proj")
    attn.o_proj, bias = take_cols(attn.o_proj, q[0], q[1], f"{path}.o_proj")
    attn.q_size, attn.kv_size = heads.q_count * d, heads.kv_count * d
    attn.fused_shards = {"qkv_proj": [attn.q_size, attn.kv_size, attn.kv_size]}
    attn.attn.num_heads, attn.attn.num_kv_heads = heads.q_count, heads.kv_count
    return [ShardHook(f"{path}.o_proj", ReduceOutput(ctx, bias))]


def _shard_mlp(mlp: nn.Module, ctx: TPContext, path: str) -> list[ShardHook]:
    if isinstance(mlp, MLP):
        inter = mlp.down_proj.in_features
        a, b = even_range(inter, ctx.rank, ctx.world_size, f"{path} intermediate size")
        device = _device_of(mlp.gate_up_proj)
        mlp.gate_up_proj = take_rows(
            mlp.gate_up_proj, ranges_index([(a, b), (inter + a, inter + b)], device), f"{path}.gate_up_proj"
        )
        mlp.down_proj, bias = take_cols(mlp.down_proj, a, b, f"{path}.down_proj")
        mlp.fused_shards = {"gate_up_proj": [b - a, b - a]}
        return [ShardHook(f"{path}.down_proj", ReduceOutput(ctx, bias))]
    if isinstance(mlp, SparseMoE):
        hooks = [_shard_experts(mlp.experts, ctx, f"{path}.experts")]
        if mlp.shared_expert is not None:
            hooks += _shard_mlp(mlp.shared_expert, ctx, f"{path}.shared_expert")
        return hooks
    raise TypeError(f"{path}: no tensor-parallel rule for {type(mlp).__name__}")


def _shard_experts(experts: Experts, ctx: TPContext, path: str) -> ShardHook:
    """Every rank keeps all experts with its slice of their intermediate size; their outputs are partial sums.
    Experts quantized on the fly: each expert's quantized linears are sliced the same way (distributed/experts.py)."""
    _, two_i, _ = experts.gate_up_proj.shape  # (E, 2I, H)
    inter = two_i // 2
    a, b = even_range(inter, ctx.rank, ctx.world_size, f"{path} intermediate size")
    if is_quantized_stack(experts, "gate_up_proj") and is_quantized_stack(experts, "down_proj"):
        shard_quantized_stack(
            experts, "gate_up_proj", 1, [(a, b), (inter + a, inter + b)], False, f"{path}.gate_up_proj"
        )
        # placeholders: (E, 2I/tp, H), (E, H, I/tp)
        shard_quantized_stack(experts, "down_proj", 2, [(a, b)], False, f"{path}.down_proj")
        return ShardHook(path, ReduceOutput(ctx))
    gate_up = experts.gate_up_proj.detach()
    experts.gate_up_proj = nn.Parameter(
        torch.cat([gate_up[:, a:b], gate_up[:, inter + a : inter + b]], dim=1).contiguous(), requires_grad=False
    )  # (E, 2I/tp, H)
    experts.down_proj = nn.Parameter(experts.down_proj.detach()[..., a:b].contiguous(), requires_grad=False)
    return ShardHook(path, ReduceOutput(ctx))


def _experts_summary(model: nn.Module, ctx: TPContext) -> dict:
    """The rank's slice of the experts' intermediate size, and their quantization method if any."""
    experts = next((m for m in model.modules() if isinstance(m, Experts)), None)
    if experts is None:
        return {}
    inter = experts.gate_up_proj.shape[1] // 2  # (E, 2I, H)
    summary: dict = dict(experts_intermediate=list(even_range(inter, ctx.rank, ctx.world_size, "experts")))
    if experts.flab_quantized is not None:
        summary["experts_quantized"] = experts.flab_quantized.method
    return summary


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")
