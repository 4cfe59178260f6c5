"""ModelOptions: everything a native decoder needs from an HF config, in one validated dataclass.

Each family turns its config into options once (`options_from_config` plus the family's overrides);
the shared layers in llama.py read only these options, never the HF config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from transformers import PretrainedConfig

from backend.core.errors import UnsupportedModelError
from backend.layers.activation import resolve_activation


@dataclass(frozen=True)
class ModelOptions:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    act: str  # "silu" | "gelu_tanh" | "gelu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before rotary
    norm_offset: float = 0.0  # Gemma: (1 + weight)
    embed_scale: float | None = None  # Gemma: sqrt(hidden_size)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sandwich_norm: bool = False  # Gemma2: post-attention, pre- and post-feedforward norms
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    tie_word_embeddings: bool = False

    def with_(self, **changes) -> "ModelOptions":
        return replace(self, **changes)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def sliding_windows_of(config: PretrainedConfig, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer window: `config.layer_types` when present, else `config.sliding_window` on every layer."""
    window = getattr(config, "sliding_window", None) or None  # 0 means off (Qwen2-MoE)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise UnsupportedModelError(f"layer types {sorted(unknown)} have no native implementation")
        return tuple(window if t == "sliding_attention" else None for t in layer_types[:num_layers])
    return (window,) * num_layers


def uniform_windows(config: PretrainedConfig) -> tuple[int | None, ...]:
    """`config.sliding_window` on every layer (Mistral, Mixtral, Phi3 ignore layer_types)."""
    return ((getattr(config, "sliding_window", None) or None),) * config.num_hidden_layers


def options_from_config(config: PretrainedConfig, **overrides) -> ModelOptions:
    """Llama-style defaults read from `config`; families pass what differs as overrides."""
    heads = config.num_attention_heads
    num_layers = config.num_hidden_layers
    options = ModelOptions(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rms_norm_eps=config.rms_norm_eps,
        max_position=config.max_position_embeddings,
        act=resolve_activation(getattr(config, "hidden_act", "silu")),
        sliding_windows=sliding_windows_of(config, num_layers),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )
    return options.with_(**overrides)
