"""Phi3: the Llama core. Its checkpoint already stores fused `qkv_proj` and `gate_up_proj` (gate rows first),
which are exactly our module names, so they load whole; partial rotary and longrope come from the rotary layer."""

from __future__ import annotations

from transformers import PretrainedConfig

from backend.models.llama import LlamaForCausalLM
from backend.models.options import ModelOptions, options_from_config, uniform_windows


class Phi3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_options(cls, config: PretrainedConfig) -> ModelOptions:
        return options_from_config(config, sliding_windows=uniform_windows(config))
