"""Per-expert MoE checkpoints streamed into a transformers model's stacked experts, tensor by tensor.

transformers 5 holds MoE experts as stacked parameters (`experts.gate_up_proj (E, 2I, H)`, `experts.down_proj
(E, H, I)`) while most checkpoints store one tensor per expert (`experts.3.gate_proj.weight`). transformers declares
the conversion per model type (`get_checkpoint_conversion_mapping`): renamings, and converters that stack the
experts (`MergeModulelist(dim=0)`) and join gate and up (`Concatenate(dim=1)`). Its own loader applies them to
whole layers at once; `expert_regions` reads the same declarations and maps each checkpoint tensor to its place
(a `Region`: expert e, the gate or up rows) so the streaming loader puts it there directly, and the MoE experts
quantizer sees each layer complete as soon as its tensors have arrived. A conversion with any other operation
is not mapped (None): the caller uses transformers' loader.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn
from transformers import PretrainedConfig

from backend.models.checkpoint import Region, names_match

Mapped = str | Region  # a checkpoint tensor's model name, or its region of a stacked parameter


def _is(op, name: str, dim: int) -> bool:
    return type(op).__name__ == name and getattr(op, "dim", None) == dim


def _supported(transform) -> bool:
    ops = list(getattr(transform, "operations", None) or [])
    if type(transform).__name__ == "WeightRenaming":
        return not ops
    if type(transform).__name__ != "WeightConverter" or len(transform.target_patterns) != 1:
        return False
    if len(transform.source_patterns) == 1:
        return len(ops) == 1 and _is(ops[0], "MergeModulelist", 0)
    return len(ops) == 2 and _is(ops[0], "MergeModulelist", 0) and _is(ops[1], "Concatenate", 1)


def _streamed_transforms(model_type: str | None) -> list:
    """The weight conversions transformers declares for `model_type` when this module streams all of them; else []."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return []
    transforms = list(get_checkpoint_conversion_mapping(model_type) or []) if model_type else []
    return transforms if all(_supported(t) for t in transforms) else []


def streams_experts(model_type: str | None) -> bool:
    """Whether the weight conversions transformers declares for `model_type` are all ones this module streams."""
    return bool(_streamed_transforms(model_type))


def expert_regions(config: PretrainedConfig, model: nn.Module) -> Callable[[str], Mapped] | None:
    """For `model` (a transformers model whose checkpoint names need its conversions), a function from checkpoint
    name to model name or Region; None when the model type declares no conversion or one this cannot stream."""
    transforms = _streamed_transforms(getattr(config, "model_type", None))
    if not transforms:
        return None
    params = dict(model.named_parameters(remove_duplicate=False))
    renamings = [t for t in transforms if type(t).__name__ == "WeightRenaming"]
    converters = [t for t in transforms if type(t).__name__ == "WeightConverter"]

    def mapped(name: str) -> Mapped:
        for t in renamings:
            name = t.rename_source_key(name)[0]
        for t in converters:
            target, source = t.rename_source_key(name)
            if source is None or target not in params:
                continue
            expert = re.search(re.escape(source).replace(r"\*", r"(\d+)") + "$", name)
            if expert is None:
                continue
            shape = tuple(params[target].shape)  # (E, N, K): N = the concatenated sources' rows
            e, slot, slots = int(expert.group(1)), t.source_patterns.index(source), len(t.source_patterns)
            rows = shape[1] // slots
            index = (e,) if slots == 1 else (e, slice(slot * rows, (slot + 1) * rows))
            return Region(target, index, shape, shape[0] * slots)
        return name

    return mapped


def streamable(config: PretrainedConfig, model: nn.Module, keys: set[str]) -> Callable[[str], Mapped] | None:
    """`expert_regions` when, mapped through it, the checkpoint's `keys` cover every weight of `model`; else None."""
    mapper = expert_regions(config, model)
    if mapper is None:
        return None
    mapped = {m.param if isinstance(m, Region) else m for m in map(mapper, keys)}
    return mapper if names_match(model, mapped) else None
