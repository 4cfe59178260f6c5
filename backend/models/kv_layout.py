"""The KV cache layout, read from the model itself.

Native models know theirs (one slot per layer, from their options). For a transformers model, one probe
forward of a few tokens runs through our registered attention function on the real device: every call
records the module that made it and the kv heads and K / V head sizes it passes. Each call of a forward gets
its own cache slot (DiffLlama calls twice per layer, with the two halves of V), stored on the module as
`flab_kv_slots`. The same probe proves that every decoder layer's attention reached our function: a layer
that never calls it (its attention bypasses ALL_ATTENTION_FUNCTIONS, or it is a linear-attention /
state-space layer) or a model holding recurrent state the paged cache does not keep is refused here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from backend.core.errors import UnsupportedModelError
from backend.core.kv_cache import KVCacheSpec, KVSlot
from flab_kernels.attention_torch import _attend

BATCH_KWARG = "flab_batch"  # the forward kwarg that carries the step (ForwardBatch or KVProbe) to our attention

PROBE_TOKENS = 6
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "attention"}
# Module class names of layers that carry state across tokens outside the attention K/V.
STATEFUL_MODULE = re.compile(
    r"Mamba|Mixer$|SSM|Ssm[A-Z]|LinearAttention|LightningAttention|DeltaNet|ShortConv|Recurrent|Rwkv|RWKV|"
    r"[lL]stm|LSTM|Rglru|RGLRU"
)


@dataclass
class AttentionCall:
    module: nn.Module
    num_q_heads: int
    q_head_dim: int
    num_kv_heads: int
    k_head_dim: int
    v_head_dim: int
    causal: bool = True
    sliding_window: int | None = None


@dataclass
class KVProbe:
    """Passed as the batch kwarg during the probe forward: records each call and attends causally without a cache."""

    calls: list[AttentionCall] = field(default_factory=list)

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,  # (1, Hq, T, D)
        key: torch.Tensor,  # (1, Hkv, T, D)
        value: torch.Tensor,  # (1, Hkv, T, Dv)
        scale: float | None,
        softcap: float | None,
        sliding_window: int | None,
        sinks: torch.Tensor | None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:  # (1, T, Hq, Dv)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        self.calls.append(
            AttentionCall(
                module,
                query.shape[1],
                query.shape[-1],
                key.shape[1],
                key.shape[-1],
                value.shape[-1],
                bool(causal),
                sliding_window,
            )
        )
        if query.shape[-1] != key.shape[-1] or key.shape[1] != value.shape[1] or query.shape[1] % key.shape[1]:
            return query.new_zeros(query.shape[:-1] + value.shape[-1:]).transpose(1, 2)  # refused after the forward
        t = query.shape[2]
        pos = torch.arange(t, device=query.device)
        mask = pos[None, :] <= pos[:, None]  # (T, T) causal
        if sliding_window is not None:
            mask &= pos[None, :] > pos[:, None] - sliding_window
        scale = scale if scale is not None else query.shape[-1] ** -0.5
        out = _attend(query, key, value, mask[None, None], scale, softcap, sinks)  # (1, Hq, T, Dv)
        return out.transpose(1, 2)


def native_kv_spec(model: nn.Module, dtype: torch.dtype, block_size: int) -> KVCacheSpec:
    opts = model.options
    return KVCacheSpec.uniform(opts.num_layers, opts.num_kv_heads, opts.head_dim, dtype, block_size)


def kv_cache_spec(model: nn.Module, dtype: torch.dtype, block_size: int, pad_head_dims: bool = False) -> KVCacheSpec:
    """The cache layout of a loaded model (native, or a probed TransformersModel). With `pad_head_dims`
    (the Triton kernels), a slot whose K and V head sizes differ stores both at the larger one."""
    if getattr(model, "impl", None) == "native":
        return native_kv_spec(model, dtype, block_size)
    slots = getattr(model, "kv_slots", None)
    if not slots:
        raise UnsupportedModelError("the model's KV layout was not probed at load (no attention call was recorded)")
    if pad_head_dims:
        slots = tuple(s.padded() for s in slots)
    return KVCacheSpec(tuple(slots), dtype, block_size)


def decoder_layers(hf: nn.Module, num_layers: int, within: str = "") -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of the decoder layers (its dotted name): the first list of `num_layers` modules (under the
    module named `within`: a VLM's language model, whose vision tower may have as many layers)."""
    best = None
    for name, m in hf.named_modules():
        if within and not name.startswith(within + "."):
            continue
        if isinstance(m, nn.ModuleList) and len(m) == num_layers and num_layers > 0:
            if name.endswith(("layers", ".h", "blocks", "layer")):
                return name, m
            best = best or (name, m)
    return best


def language_model_name(hf: nn.Module) -> str:
    """The dotted name of a VLM's language model inside it ("" for a language model itself)."""
    get_decoder = getattr(hf, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError, TypeError):
        decoder = None
    if decoder is None or decoder is hf or not getattr(hf.config, "sub_configs", None):
        return ""
    return next((name for name, m in hf.named_modules() if m is decoder), "")


def _layer_kind(layer: nn.Module, config, index: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    kind = layer_types[index] if isinstance(layer_types, (list, tuple)) and index < len(layer_types) else None
    stateful = sorted({type(m).__name__ for m in layer.modules() if STATEFUL_MODULE.search(type(m).__name__)})
    parts = [f"layer type {kind!r}"] if kind else []
    parts += stateful[:2]
    return ", ".join(parts) or type(layer).__name__


def stateful_reason(hf: nn.Module, config) -> str | None:
    """Why a model holds state the paged KV cache does not keep (None: it does not, as far as we can tell)."""
    if getattr(type(hf), "_is_stateful", False):
        return f"{type(hf).__name__} is stateful (transformers marks it `_is_stateful`: recurrent / state-space layers)"
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):
        other = [(i, str(t)) for i, t in enumerate(layer_types) if str(t) not in ATTENTION_LAYER_TYPES]
        if other:
            kinds = sorted({t for _, t in other})
            what = (
                "attention variants the paged attention does not implement (chunked / indexed sparse attention)"
                if all(t.endswith("_attention") and "linear" not in t for t in kinds)
                else "layers that keep linear-attention / state-space / convolution state across tokens"
            )
            return f"decoder layers {[i for i, _ in other][:8]} are {kinds} (config.layer_types): {what}"
    names = sorted({type(m).__name__ for m in hf.modules() if STATEFUL_MODULE.search(type(m).__name__)})
    if names:
        return f"it has modules {names[:3]} (linear-attention / state-space / recurrent / convolution state)"
    return None


def expected_sliding_window(config) -> int | None:
    """The sliding window the config asks for on some layer (None: full attention everywhere)."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and "sliding_attention" not in layer_types:
        return None
    return window


def probe_kv_layout(model: nn.Module, device: torch.device) -> tuple[KVSlot, ...]:
    """Run the probe forward of a TransformersModel and return its cache slots (in call order).

    Sets `flab_kv_slots` (slot indices, one per call of a forward) on every module that called attention."""
    hf = model.hf
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    arch = type(hf).__name__
    reason = stateful_reason(hf, config)
    if reason is not None:
        raise UnsupportedModelError(
            f"{arch} cannot run on the paged KV cache: {reason}. The engine keeps only attention K/V between steps "
            "and runs full / sliding-window causal attention"
        )
    probe = KVProbe()
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    ids = torch.arange(PROBE_TOKENS, device=device) % max(vocab, 1)  # (T,)
    try:
        with torch.inference_mode():
            hf(
                input_ids=ids[None],
                position_ids=torch.arange(PROBE_TOKENS, device=device)[None],
                use_cache=False,
                **{BATCH_KWARG: probe},
            )
    except UnsupportedModelError:
        raise
    except Exception as e:  # the model cannot run as loaded (X-MOD without a default language, ...)
        raise UnsupportedModelError(
            f"{arch}: the load-time probe forward of {PROBE_TOKENS} tokens failed in the model's own code "
            f"({type(e).__name__}: {str(e)[:300]})"
        ) from e
    if not probe.calls:
        raise UnsupportedModelError(
            f"{arch}: no layer called the attention function during the probe forward; its attention does not go "
            "through transformers' ALL_ATTENTION_FUNCTIONS, so the paged KV cache cannot be used"
        )
    bad = [
        c for c in probe.calls if c.q_head_dim != c.k_head_dim or c.num_kv_heads == 0 or c.num_q_heads % c.num_kv_heads
    ]
    if bad:
        c = bad[0]
        raise UnsupportedModelError(
            f"{arch}: an attention call passes q {c.num_q_heads}x{c.q_head_dim}, k {c.num_kv_heads}x{c.k_head_dim}, "
            f"v {c.num_kv_heads}x{c.v_head_dim} (heads x head size): query and key head sizes must match and the "
            "query heads must be a multiple of the kv heads"
        )
    names = {id(m): n for n, m in hf.named_modules()}
    window = expected_sliding_window(config)
    if window is not None and not any(c.sliding_window for c in probe.calls):
        raise UnsupportedModelError(
            f"{arch}: its config sets a sliding window of {window} tokens, but no attention call receives it (the "
            "model applies it through its attention mask only, which the engine does not build)"
        )
    bidirectional = sorted({names.get(id(c.module), type(c.module).__name__) for c in probe.calls if not c.causal})
    if bidirectional:
        raise UnsupportedModelError(
            f"{arch}: attention modules {bidirectional[:3]} attend bidirectionally (is_causal=False); the engine "
            "generates causally only. An encoder checkpoint (BERT-style) generates causally only when its config "
            "sets is_decoder=True"
        )
    found = decoder_layers(hf, int(getattr(config, "num_hidden_layers", 0) or 0), language_model_name(hf))
    layer_of: dict[int, int] = {}
    if found is not None:
        prefix, layers = found
        for call in probe.calls:
            name = names.get(id(call.module), "")
            head = name.removeprefix(prefix + ".").split(".", 1)[0] if name.startswith(prefix + ".") else ""
            if head.isdigit():
                layer_of[id(call.module)] = int(head)
        missing = [i for i in range(len(layers)) if i not in set(layer_of.values())]
        if missing:
            kinds = sorted({_layer_kind(layers[i], config, i) for i in missing})
            raise UnsupportedModelError(
                f"{arch}: decoder layers {missing[:8]}{' ...' if len(missing) > 8 else ''} ({'; '.join(kinds)}) "
                "never called the attention function: their attention bypasses ALL_ATTENTION_FUNCTIONS or they are "
                "linear-attention / state-space layers whose state the engine does not keep"
            )
    slots: list[KVSlot] = []
    per_module: dict[int, list[int]] = {}
    for call in probe.calls:
        layer = layer_of.get(id(call.module), getattr(call.module, "layer_idx", -1))
        per_module.setdefault(id(call.module), []).append(len(slots))
        slots.append(
            KVSlot(int(layer) if layer is not None else -1, call.num_kv_heads, call.k_head_dim, call.v_head_dim)
        )
    for call in probe.calls:
        call.module.flab_kv_slots = per_module[id(call.module)]
    return tuple(slots)
