"""Shard a loaded transformers model in place by the model's own tensor-parallel plan.

The plan is transformers': `config.base_model_tp_plan` (module / parameter patterns under the base model, e.g.
"layers.*.self_attn.q_proj": "colwise") and the causal-LM class's `_tp_plan` (its LM head). Styles:

    colwise                       output features split (q/k/v by attention heads; kv heads replicated when
                                  there are fewer than ranks); output stays split
    rowwise                       input features split; partial outputs summed over ranks, bias added once
    colwise_gather_output / colwise_rep   colwise, then every rank gets the whole output
    rowwise_split_input / rowwise_rep     rowwise on a replicated input (each rank slices it)
    packed_colwise / packed_rowwise       the same split of each half of a packed [gate; up] dim
    moe_tp_experts                the experts module's outputs are partial sums: summed over ranks (its stacked
                                  parameters split by their own entries; experts quantized on the fly: each
                                  expert's quantized linears split the same way, backend/distributed/experts.py)
    embedding_rowwise             vocab-parallel embedding
    replicate / replicated_with_grad_allreduce    whole on every rank

The input embedding (a plain `nn.Embedding`) and a linear LM head are vocab parallel whether or not the plan
names them (logits gathered on rank 0, which samples). Any other style, or a model without a plan, is refused.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from backend.core.errors import UnsupportedModelError
from backend.distributed.comm import TPContext
from backend.distributed.experts import is_quantized_stack, shard_quantized_stack
from backend.distributed.hooks import (
    GatherLogits,
    GatherOutput,
    ReduceOutput,
    ShardHook,
    SplitInput,
    VocabParallelEmbedding,
)
from backend.distributed.partition import even_range, head_shard, vocab_range
from backend.distributed.slicing import ranges_index, take_cols, take_rows

COLWISE = {"colwise"}
GATHERED = {"colwise_gather_output", "colwise_rep"}
ROWWISE = {"rowwise"}
SPLIT_INPUT = {"rowwise_split_input", "rowwise_rep"}
PACKED = {"packed_colwise", "packed_rowwise"}
REPLICATED = {"replicate", "replicated_with_grad_allreduce"}
MODULE_STYLES = {"moe_tp_experts", "all_reduce", "embedding_rowwise"}
SUPPORTED = COLWISE | GATHERED | ROWWISE | SPLIT_INPUT | PACKED | REPLICATED | MODULE_STYLES


def model_tp_plan(hf: nn.Module) -> dict[str, str]:
    """The plan as full module / parameter name patterns of `hf`; refuses a model without one."""
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    base_plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    if not base_plan:
        raise UnsupportedModelError(
            f"{type(hf).__name__} (model_type={config.model_type!r}) has no tensor-parallel plan (its config's "
            "base_model_tp_plan is empty), so it cannot be split over ranks: use tp_size=1"
            + (", or model_impl='native'" if _has_native(config) else "")
        )
    if not any(".experts" in k for k in base_plan):
        base_plan.update(_experts_from_ep_plan(config))
    base = getattr(hf, "base_model_prefix", "") or ""
    plan = {(f"{base}.{k}" if base and hasattr(hf, base) else k): v for k, v in base_plan.items()}
    plan.update(dict(getattr(hf, "_tp_plan", None) or {}))
    return plan


# transformers 5.25 moved the MoE experts of many models (Mixtral, Qwen2/3-MoE, ...) from base_model_tp_plan to an
# expert-parallel plan; split over ranks the way the tensor-parallel plan split them before (the stacked [gate; up]
# rows and the down columns of every expert), so tensor parallelism still shards the experts.
EXPERTS_TP_STYLES = {
    "experts": "moe_tp_experts",
    "experts.gate_up_proj": "packed_colwise",
    "experts.gate_up_proj_bias": "packed_colwise",
    "experts.up_proj": "colwise",
    "experts.gate_proj": "colwise",
    "experts.down_proj": "rowwise",
    "experts.down_proj_bias": "rowwise",  # refused when sharded: a row-parallel bias would be added per rank
}


def _experts_from_ep_plan(config) -> dict[str, str]:
    """The experts entries of `config.base_model_ep_plan` as tensor-parallel styles (EXPERTS_TP_STYLES)."""
    found = {}
    for pattern in dict(getattr(config, "base_model_ep_plan", None) or {}):
        for suffix, style in EXPERTS_TP_STYLES.items():
            if pattern == suffix or pattern.endswith("." + suffix):
                found[pattern] = style
    return found


def _has_native(config) -> bool:
    from backend.models import NATIVE_MODELS

    return any(a in NATIVE_MODELS for a in getattr(config, "architectures", None) or [])


def _matcher(plan: dict[str, str]) -> list[tuple[re.Pattern, str, str]]:
    return [(re.compile("^" + re.escape(k).replace(r"\*", r"\d+") + "$"), k, v) for k, v in plan.items()]


def shard_transformers(model: nn.Module, ctx: TPContext) -> tuple[list[ShardHook], dict]:
    """Cut the TransformersModel `model` (its `.hf`) to rank `ctx.rank`'s part; returns hooks and a summary."""
    hf = model.hf
    plan = model_tp_plan(hf)
    rules = _matcher(plan)
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    num_heads = int(config.num_attention_heads)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    unknown = sorted({f"{k}: {v!r}" for k, v in plan.items() if v not in SUPPORTED})
    if unknown:
        raise UnsupportedModelError(
            f"{type(hf).__name__}: its tensor-parallel plan uses styles the engine does not run ({unknown[:3]}); "
            f"supported: {sorted(SUPPORTED)}. Use tp_size=1"
        )
    hooks: list[ShardHook] = []
    heads = head_shard(num_heads, num_kv, ctx.rank, ctx.world_size, type(hf).__name__)
    embed = hf.get_input_embeddings()
    lm_head = hf.get_output_embeddings()
    embed_path = _path_of(hf, embed)
    head_path = _path_of(hf, lm_head) if lm_head is not None else None
    styled: dict[str, str] = {}
    for name, _ in list(hf.named_modules()) + list(hf.named_parameters()):
        for regex, _, style in rules:
            if regex.match(name):
                styled[name] = style
                break
    split_attention: set[str] = set()
    experts_summary: dict = {}
    for name, style in styled.items():
        if name in (embed_path, head_path) or style in REPLICATED:
            continue
        prefix = f"hf.{name}"
        if style in MODULE_STYLES and style != "embedding_rowwise":
            hooks.append(ShardHook(prefix, ReduceOutput(ctx)))
            continue
        if style == "embedding_rowwise":
            continue  # the embedding is handled below
        if _is_param(hf, name):
            _shard_param(hf, name, style, ctx, experts_summary)
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = hf.get_submodule(parent_name) if parent_name else hf
        module = getattr(parent, leaf)
        if style in COLWISE | GATHERED | {"packed_colwise"}:
            rows = _col_rows(module, parent, style, heads, num_heads, num_kv, ctx, name)
            if style in COLWISE and hasattr(parent, "head_dim"):
                split_attention.add(parent_name)
            setattr(parent, leaf, take_rows(module, rows, name))
            if style in GATHERED:
                hooks.append(ShardHook(prefix, GatherOutput(ctx)))
        elif style in ROWWISE | SPLIT_INPUT | {"packed_rowwise"}:
            k = module.in_features
            if style == "packed_rowwise":
                raise UnsupportedModelError(f"{name}: packed_rowwise on a linear layer is not a layout the engine runs")
            a, b = even_range(k, ctx.rank, ctx.world_size, name)
            sliced, bias = take_cols(module, a, b, name)
            setattr(parent, leaf, sliced)
            if style in SPLIT_INPUT:
                hooks.append(ShardHook(prefix, SplitInput(a, b), pre=True))
            hooks.append(ShardHook(prefix, ReduceOutput(ctx, bias)))
    for attn_name in split_attention:
        _set_head_counts(hf.get_submodule(attn_name), heads.q_count, heads.kv_count)
    summary = dict(
        plan={k: v for k, v in plan.items()},
        q_heads=[heads.q_start, heads.q_start + heads.q_count] if split_attention else [0, num_heads],
        kv_heads=[heads.kv_start, heads.kv_start + heads.kv_count] if split_attention else [0, num_kv],
        kv_heads_replicated=heads.kv_replicated if split_attention else True,
    )
    summary.update(experts_summary)
    summary.update(_shard_vocab(model, hf, embed, embed_path, lm_head, head_path, ctx, hooks))
    return hooks, summary


def _col_rows(module, parent, style, heads, num_heads, num_kv, ctx, name) -> torch.Tensor:
    n = module.out_features
    device = _device_of(module)
    d = getattr(parent, "head_dim", None)
    if style in COLWISE and isinstance(d, int) and d > 0 and n in (num_heads * d, num_kv * d):
        if n == num_heads * d:  # query heads (also when q and kv head counts agree)
            start, count = heads.q_start, heads.q_count
        else:
            start, count = heads.kv_start, heads.kv_count
        return torch.arange(start * d, (start + count) * d, device=device)
    if style == "packed_colwise":
        half = n // 2
        a, b = even_range(half, ctx.rank, ctx.world_size, name)
        return ranges_index([(a, b), (half + a, half + b)], device)
    a, b = even_range(n, ctx.rank, ctx.world_size, name)
    return torch.arange(a, b, device=device)


def _shard_param(hf: nn.Module, name: str, style: str, ctx: TPContext, summary: dict) -> None:
    """A stacked parameter (MoE experts): colwise / packed_colwise split dim -2, rowwise split the last dim. Experts
    quantized on the fly (a meta placeholder for the stacked weight): the same split of each expert's quantized
    linear (backend/distributed/experts.py)."""
    module_name, _, leaf = name.rpartition(".")
    module = hf.get_submodule(module_name)
    param = getattr(module, leaf)
    p = param.detach()
    if style in ROWWISE | SPLIT_INPUT | {"packed_rowwise"} and (p.ndim < 2 or leaf.endswith("bias")):
        # the module adds it inside its own forward, before the partial sums are added up: tp_size times
        raise UnsupportedModelError(
            f"{name}: a row-parallel bias parameter ({style!r}) would be added once per rank; use tp_size=1"
        )
    if getattr(module, "has_bias", False) and hasattr(module, "is_transposed") and p.ndim == 3:
        # experts biases (E, N) are neither in the plans nor split with the weights: the down bias would be added
        # once per rank and the up bias would not match the rank's outputs
        raise UnsupportedModelError(
            f"{name}: the plan splits experts whose modules add biases inside their forward ({type(module).__name__}); "
            "tensor parallelism does not split these experts: use tp_size=1"
        )
    if p.ndim < 2:
        dim = 0
    else:
        dim = p.ndim - 2 if style in COLWISE | GATHERED | {"packed_colwise"} else p.ndim - 1
    size = p.shape[dim]
    if style in PACKED:
        half = size // 2
        a, b = even_range(half, ctx.rank, ctx.world_size, name)
        ranges = [(a, b), (half + a, half + b)]
    else:
        a, b = even_range(size, ctx.rank, ctx.world_size, name)
        ranges = [(a, b)]
    if p.ndim == 3 and leaf != "down_proj":
        summary.setdefault("experts_intermediate", [a, b])
    if p.ndim == 3 and is_quantized_stack(module, leaf):
        shard_quantized_stack(module, leaf, dim, ranges, bool(getattr(module, "is_transposed", False)), name)
        summary.setdefault("experts_quantized", module.flab_quantized.method)
        return
    index = ranges_index(ranges, p.device)
    setattr(module, leaf, nn.Parameter(p.index_select(dim, index).contiguous(), requires_grad=False))


def _shard_vocab(model, hf, embed, embed_path, lm_head, head_path, ctx, hooks) -> dict:
    """Vocab-parallel input embedding (a plain nn.Embedding) and LM head (a linear with vocab outputs)."""
    vocab = int(embed.weight.shape[0]) if isinstance(embed, nn.Embedding) else None
    summary: dict = {}
    shard = None
    tied = lm_head is not None and getattr(lm_head, "weight", None) is getattr(embed, "weight", None)
    if type(embed) is nn.Embedding and embed.max_norm is None:
        start, end = vocab_range(vocab, ctx.rank, ctx.world_size)
        shard = nn.Parameter(embed.weight.detach()[start:end].contiguous(), requires_grad=False)
        _set_path(hf, embed_path, VocabParallelEmbedding(shard, start, vocab, ctx, embed.padding_idx))
        summary["vocab_rows"] = [start, end]
    if lm_head is not None and hasattr(lm_head, "out_features") and head_path is not None:
        full = lm_head.out_features
        start, end = vocab_range(full, ctx.rank, ctx.world_size)
        if tied and shard is not None and isinstance(lm_head, nn.Linear):
            lm_head.weight = shard
        elif tied:  # a tied head whose embedding stays whole: keep the head whole too
            return summary
        else:
            rows = torch.arange(start, end, device=_device_of(lm_head))
            _set_path(hf, head_path, take_rows(lm_head, rows, head_path))
        hooks.append(ShardHook(f"hf.{head_path}", GatherLogits(ctx, full)))
        summary["lm_head_rows"] = [start, end]
    return summary


def _set_head_counts(attn: nn.Module, q: int, kv: int) -> None:
    """Attributes some attention modules read in their forward, set to this rank's head counts."""
    for attr in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, q)
    for attr in ("num_key_value_heads", "num_kv_heads"):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, kv)
    if isinstance(getattr(attn, "num_key_value_groups", None), int):
        attn.num_key_value_groups = q // kv


def _is_param(hf: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    try:
        module = hf.get_submodule(module_name) if module_name else hf
    except AttributeError:
        return False
    return leaf in module._parameters


def _path_of(root: nn.Module, target: nn.Module | None) -> str | None:
    for name, m in root.named_modules():
        if m is target:
            return name
    return None


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")
