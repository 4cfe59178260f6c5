"""Gemma and Gemma2: the Llama core with (1 + w) RMSNorm, sqrt(hidden) embedding scale and GeLU-tanh;
Gemma2 adds attention-logit and final-logit softcapping, sandwich norms, query_pre_attn_scalar and
sliding-window attention on the layers `config.layer_types` marks."""

from __future__ import annotations

from transformers import PretrainedConfig

from backend.layers.activation import resolve_activation
from backend.models.llama import LlamaForCausalLM
from backend.models.options import ModelOptions, options_from_config


def _gemma_options(config: PretrainedConfig, **overrides) -> ModelOptions:
    bias = bool(getattr(config, "attention_bias", False))
    return options_from_config(
        config, qkv_bias=bias, o_bias=bias, norm_offset=1.0, embed_scale=config.hidden_size**0.5, **overrides
    )


class GemmaForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_options(cls, config: PretrainedConfig) -> ModelOptions:
        return _gemma_options(config)


class Gemma2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_options(cls, config: PretrainedConfig) -> ModelOptions:
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "gelu_pytorch_tanh")
        return _gemma_options(
            config,
            act=resolve_activation(act),
            attn_scale=config.query_pre_attn_scalar**-0.5,
            attn_softcap=getattr(config, "attn_logit_softcapping", None),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            sandwich_norm=True,
        )
