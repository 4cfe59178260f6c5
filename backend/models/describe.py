"""describe_model(model) -> dict: what runs, for the UI, the notebook and `engine.describe()`.

Works for native models and for the transformers wrapper: implementation, the attention used, which
modules were swapped (quantized linears, per class; MoE experts quantized per expert) or injected into (the
attention function), and the model's shape (parameters, layers, heads, kv heads, head dim).
"""

from __future__ import annotations

from collections import Counter

from torch import nn

NATIVE_ATTENTION = "paged (native PagedAttention)"
PAGED_ATTENTION_CLASSES = ("PagedAttention", "FusedPagedAttention")  # FusedPagedAttention: backend/layers/cpu/fused.py


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _count_parameters(model: nn.Module) -> int:
    """Unique parameters, plus the logical size (in x out (+ bias)) of quantized linears, whose tensors are buffers,
    and the weights of PackedLinears and SiblingLinears (packed buffers; a tied one keeps its shared parameter)."""
    unique = {(p.data_ptr(), p.shape) if not p.is_meta else id(p): p for p in model.parameters()}  # tied: same storage
    total = sum(p.numel() for p in unique.values())
    in_experts = _in_quantized_experts(model)  # their stacked parameters' meta placeholders are counted above
    for module in model.modules():
        if id(module) in in_experts:
            continue
        if hasattr(module, "load_tensor") and hasattr(module, "in_features"):
            total += module.in_features * module.out_features
            if getattr(module, "has_bias", False):
                total += module.out_features
        else:  # PackedLinear / SiblingLinear: weights held as packed buffers
            total += getattr(module, "packed_numel", 0)
    return total


def _rope_table_bytes(model: nn.Module) -> int:
    """Bytes of the rotary-embedding buffers (native models precompute cos/sin for every position, transformers
    keeps only inv_freq): counted in weights_bytes, so the two implementations of one checkpoint differ by them."""
    seen: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        if "rotary" not in type(module).__name__.lower() and not name.endswith("rotary_emb"):
            continue
        for b in module.buffers(recurse=False):
            if b.is_meta or b.data_ptr() in seen:
                continue
            seen.add(b.data_ptr())
            total += b.numel() * b.element_size()
    return total


def _quantized_experts(model: nn.Module) -> list[nn.Module]:
    """The QuantizedExperts holders (backend/quantization/experts.py) of MoE experts quantized on the fly."""
    return [m for m in model.modules() if type(m).__name__ == "QuantizedExperts"]


def _in_quantized_experts(model: nn.Module) -> set[int]:
    """ids of the per-expert quantized linears inside QuantizedExperts holders."""
    return {id(m) for holder in _quantized_experts(model) for m in holder.modules() if m is not holder}


def _quantized(model: nn.Module) -> dict[str, int]:
    """Quantized linears per class, the per-expert ones of quantized MoE experts aside."""
    in_experts = _in_quantized_experts(model)
    return dict(
        Counter(type(m).__name__ for m in model.modules() if hasattr(m, "load_tensor") and id(m) not in in_experts)
    )


def _experts_quantization(model: nn.Module) -> dict | None:
    """{method, modules, experts, linears} of the MoE experts quantized on the fly, None when there are none."""
    holders = _quantized_experts(model)
    if not holders:
        return None
    first = holders[0].up[0]
    return dict(
        method=holders[0].method,
        modules=len(holders),  # experts modules (one per MoE layer)
        experts=sum(h.num_experts for h in holders),
        linears=sum(2 * h.num_experts for h in holders),  # each expert's gate_up (or up) and down
        format=first.describe(),
        kernel=first.kernel,
    )


def _global(cfg, name: str):
    """A config attribute, None where it is absent or varies across layers (transformers' heterogeneous configs,
    e.g. Gemma 4's per-layer head_dim, raise AmbiguousGlobalPerLayerAttributeError on the global read)."""
    try:
        return getattr(cfg, name, None)
    except Exception:
        return None


def _shape(model: nn.Module) -> dict:
    from backend.core.kv_sizing import model_context_len  # the engine's own reading of the model's context

    cfg = _text_config(model)
    heads = _global(cfg, "num_attention_heads")
    hidden = _global(cfg, "hidden_size")
    head_dim = _global(cfg, "head_dim") or (hidden // heads if hidden and heads else None)
    return dict(
        architecture=(_global(cfg, "architectures") or [type(model).__name__])[0],
        model_type=_global(cfg, "model_type"),
        layers=_global(cfg, "num_hidden_layers"),
        heads=heads,
        kv_heads=_global(cfg, "num_key_value_heads") or heads,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=_global(cfg, "vocab_size"),
        model_context_len=model_context_len(cfg) if cfg is not None else None,
    )


def _describe_native(model: nn.Module) -> dict:
    opts = model.options
    attention_layers = [m for m in model.modules() if type(m).__name__ in PAGED_ATTENTION_CLASSES]
    windows = sorted({w for w in opts.sliding_windows if w is not None})
    return dict(
        implementation="native",
        model_class=f"{type(model).__module__}.{type(model).__name__}",
        attention=NATIVE_ATTENTION,
        attention_modules=len(attention_layers),
        injected={},
        fused_projections=sorted({k for m in model.modules() for k in getattr(m, "fused_shards", {})}),
        rope_type=model.model.rotary_emb.rope_type,
        sliding_window=windows or None,
        attn_softcap=opts.attn_softcap,
        final_softcap=opts.final_softcap,
        layers=opts.num_layers,
        heads=opts.num_heads,
        kv_heads=opts.num_kv_heads,
        head_dim=opts.head_dim,
    )


def _describe_transformers(model: nn.Module) -> dict:
    hf = model.hf
    attention_modules = [m for m in hf.modules() if getattr(m, "flab_kv_slots", None)]  # probed (kv_layout.py)
    name = getattr(model, "attention_name", None) or getattr(hf.config, "_attn_implementation", None)
    classes = Counter(type(m).__name__ for m in attention_modules)
    return dict(
        implementation="transformers",
        model_class=f"{type(hf).__module__}.{type(hf).__name__}",
        attention=name,
        attention_modules=len(attention_modules),
        injected={f"attention function {name!r}": dict(classes)},
    )


CPU_LINEAR_CLASSES = {
    "UpcastLinear": "fp32 copy for CPU matmuls",
    "PackedLinear": "oneDNN prepacked 16-bit weight",
    "SiblingLinear": "q/k/v or gate/up as one oneDNN product",
    "FusedLinear": "C++ GEMV for decode rows",
    "FusedRMSNorm": "C++ RMSNorm with the residual add",
    "FusedPagedAttention": "C++ paged decode attention",
}


def describe_model(model: nn.Module) -> dict:
    """A plain dict (JSON-serialisable) describing `model` (a native model or a TransformersModel)."""
    info = _shape(model)
    if getattr(model, "impl", None) == "native":
        info.update(_describe_native(model))
    elif hasattr(model, "hf"):
        info.update(_describe_transformers(model))
    else:
        info.update(implementation=getattr(model, "impl", "unknown"), attention=None, injected={})
    quantized = _quantized(model)
    info["swapped"] = {f"quantized linear {cls}": n for cls, n in quantized.items()}
    for cls, what in CPU_LINEAR_CLASSES.items():  # backend/layers/{upcast,packed,siblings}.py
        count = sum(type(m).__name__ == cls for m in model.modules())
        if count:
            info["swapped"][f"{cls} ({what})"] = count
    packed_experts = sum(getattr(m, "flab_packed", None) is not None for m in model.modules())
    if packed_experts:  # backend/models/moe.py (native), backend/layers/cpu/packed_experts.py (transformers)
        info["swapped"]["MoE experts (oneDNN prepacked per expert)"] = packed_experts
    experts = _experts_quantization(model)
    if experts is not None:  # backend/quantization/experts.py
        info["swapped"][f"MoE experts quantized per expert ({experts['method']})"] = experts["modules"]
        info["quantized_experts"] = experts
    if getattr(model, "impl_reason", None):  # why `auto` chose this implementation (backend/loading/build.py)
        info["impl_reason"] = model.impl_reason
    info["quantized_linears"] = sum(quantized.values())
    info["parameters"] = _count_parameters(model)
    info["rope_table_bytes"] = _rope_table_bytes(model)
    info["module_tree"] = module_tree(model)
    return info


def _role(name: str, module: nn.Module, native: bool) -> str:
    """What the engine did to this module, "" when it runs as the model defines it."""
    cls = type(module).__name__
    if cls in PAGED_ATTENTION_CLASSES:
        return "our paged attention"
    if not native and cls.endswith("Attention") and hasattr(module, "layer_idx"):
        return "attention function injected (ours)"
    if cls == "QuantizedExperts":
        return f"swapped: MoE experts quantized per expert ({module.method})"
    if hasattr(module, "load_tensor"):
        return f"swapped: quantized linear {cls}"
    if cls in CPU_LINEAR_CLASSES:
        return f"swapped: {CPU_LINEAR_CLASSES[cls]}"
    if getattr(module, "flab_packed", None) is not None:
        return "swapped: MoE experts prepacked"
    return ""


def module_tree(model: nn.Module, max_rows: int = 400) -> list[dict]:
    """The module tree as rows {name, cls, depth, role, repeat}, with the modules the engine replaced or injected
    into marked by `role`. A list of same-class modules (the decoder layers) shows its first entry with
    `repeat` = the count; the others have the same structure."""
    native = getattr(model, "impl", None) == "native"
    root = model.hf if hasattr(model, "hf") else model
    rows: list[dict] = []

    def walk(name: str, module: nn.Module, depth: int, repeat: int = 1) -> None:
        if len(rows) >= max_rows:
            return
        rows.append(
            dict(name=name, cls=type(module).__name__, depth=depth, role=_role(name, module, native), repeat=repeat)
        )
        children = list(module.named_children())
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and children:
            if len({type(c).__name__ for _, c in children}) == 1:
                first_name, first = children[0]
                walk(f"{name}.{first_name}" if name else first_name, first, depth + 1, repeat=len(children))
                return
        for child_name, child in children:
            walk(f"{name}.{child_name}" if name else child_name, child, depth + 1)

    walk("", root, 0)
    return rows
