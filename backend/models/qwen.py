"""Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm): the Llama core with different options."""

from __future__ import annotations

from transformers import PretrainedConfig

from backend.models.llama import LlamaForCausalLM
from backend.models.options import ModelOptions, options_from_config


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_options(cls, config: PretrainedConfig) -> ModelOptions:
        return options_from_config(config, qkv_bias=True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_options(cls, config: PretrainedConfig) -> ModelOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return options_from_config(config, qkv_bias=bias, o_bias=bias, qk_norm=True)
