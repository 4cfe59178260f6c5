"""Model registry and the implementation switch (auto | native | transformers)."""

from __future__ import annotations

import importlib
import logging

import torch
from torch import nn
from transformers import PretrainedConfig

from backend.core.errors import UnsupportedModelError
from backend.models.vlm import is_image_text_config

logger = logging.getLogger(__name__)

# HF architecture name -> "module:Class" of our native implementation.
NATIVE_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "backend.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "backend.models.llama:MistralForCausalLM",
    "Qwen2ForCausalLM": "backend.models.qwen:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "backend.models.qwen:Qwen3ForCausalLM",
    "GemmaForCausalLM": "backend.models.gemma:GemmaForCausalLM",
    "Gemma2ForCausalLM": "backend.models.gemma:Gemma2ForCausalLM",
    "Phi3ForCausalLM": "backend.models.phi3:Phi3ForCausalLM",
    "MixtralForCausalLM": "backend.models.moe:MixtralForCausalLM",
    "Qwen2MoeForCausalLM": "backend.models.moe:Qwen2MoeForCausalLM",
}


def architecture_of(config: PretrainedConfig) -> str:
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else type(config).__name__.replace("Config", "ForCausalLM")


def needs_weight_conversion(config: PretrainedConfig) -> str | None:
    """Why the checkpoint of `config` needs transformers' own weight-name conversions before a native model can
    read it (None: it does not). That is the case when the config's model_type is not the one of the transformers
    class it names, and transformers registers a conversion for that model_type (e.g. model_type "exaone" with
    architectures ["LlamaForCausalLM"]: transformers maps EXAONE's names onto Llama's when it loads)."""
    import transformers
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    arch = architecture_of(config)
    hf_cls = getattr(transformers, arch, None)
    own_type = getattr(getattr(hf_cls, "config_class", None), "model_type", None)
    model_type = getattr(config, "model_type", None)
    if own_type is None or model_type == own_type or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    return (
        f"its config has model_type {model_type!r} while {arch} is a {own_type!r} model: transformers renames "
        f"{model_type!r} checkpoints' weights when it loads them"
    )


IMAGE_TEXT_REASON = (
    "an image-text-to-text model: its vision tower and the merge of image features run in transformers' own "
    "modeling code, with the paged attention injected into its language model (there are no native VLMs)"
)


def select_model_impl(config: PretrainedConfig, requested: str) -> str:
    arch = architecture_of(config)
    if requested == "transformers":
        return "transformers"
    if is_image_text_config(config):
        if requested == "native":
            raise UnsupportedModelError(
                f"{arch} is an image-text-to-text model; model_impl='native' runs language models only. Use "
                "model_impl='transformers' (or 'auto', which picks it for such models)"
            )
        logger.info("%s is %s", arch, IMAGE_TEXT_REASON)
        return "transformers"
    custom_code = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if requested == "auto" and custom_code:
        logger.info("%s ships its own modeling code (auto_map): using the transformers fallback", arch)
        return "transformers"
    conversion = needs_weight_conversion(config) if arch in NATIVE_MODELS else None
    if conversion is not None:
        if requested == "native":
            raise UnsupportedModelError(
                f"the native {arch} cannot load this checkpoint: {conversion}. Use model_impl='transformers' "
                "(or 'auto', which picks it for such checkpoints)"
            )
        logger.info("%s: %s; using the transformers fallback, which converts them", arch, conversion)
        return "transformers"
    if arch in NATIVE_MODELS:
        return "native"
    if requested == "native":
        raise UnsupportedModelError(
            f"no native implementation for {arch}; natively supported: {sorted(NATIVE_MODELS) or 'none'}. "
            "Use model_impl='transformers' (or 'auto') to run it through the transformers fallback."
        )
    logger.info("%s has no native implementation: using the transformers fallback", arch)
    return "transformers"


def build_model(config: PretrainedConfig, impl: str, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """Build the model on the meta device (weights are streamed in afterwards)."""
    if impl == "native":
        module_name, cls_name = NATIVE_MODELS[architecture_of(config)].split(":")
        cls = getattr(importlib.import_module(module_name), cls_name)
        with torch.device("meta"):
            return cls(config, dtype)
    from backend.models.transformers import TransformersModel

    return TransformersModel(config, dtype, trust_remote_code)
