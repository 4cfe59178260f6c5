"""The transformers fallback: the HF modeling code owns the module tree, our paged attention is injected.

We register an attention function under our own name with transformers' `AttentionInterface` and
build the model with `attn_implementation=` that name. The whole mixed batch runs as one row
`[1, num_tokens]` with per-token `position_ids`; the step's metadata (`ForwardBatch`) travels as a
forward kwarg, which transformers hands down to every attention call. Because the name is not
registered as a mask function, transformers builds no attention mask: the engine owns causality.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM, PretrainedConfig

from backend.core.errors import UnsupportedModelError
from backend.core.forward_batch import ForwardBatch
from backend.layers.attention import paged_attention
from backend.models.kv_layout import BATCH_KWARG, KVProbe, probe_kv_layout
from backend.models.vlm import (
    attention_implementations,
    bidirectional_spans,
    check_image_text_class,
    check_own_positions,
    deepstack_logits,
    encode_images,
    image_input_refusal,
    image_probe_refusal,
    image_text_class,
    image_token_id,
    rope_index,
)

ATTENTION_NAME = "fallback_lab_paged"


def fallback_lab_attention(
    module: nn.Module,
    query: torch.Tensor,  # (1, Hq, T, D)
    key: torch.Tensor,  # (1, Hkv, T, D)
    value: torch.Tensor,  # (1, Hkv, T, Dv)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    batch: ForwardBatch | KVProbe | None = kwargs.get(BATCH_KWARG)
    softcap, window, sinks = kwargs.get("softcap"), kwargs.get("sliding_window"), kwargs.get("s_aux")
    if isinstance(batch, KVProbe):  # the load-time probe forward (backend/models/kv_layout.py)
        return batch.attend(module, query, key, value, scaling, softcap, window, sinks, kwargs.get("is_causal")), None
    if batch is None:  # a model that drops the forward kwargs on the way down, or a call from outside the engine
        raise UnsupportedModelError(
            f"{type(module).__name__} called the {ATTENTION_NAME} attention without the engine's {BATCH_KWARG!r} "
            "forward kwarg: the model's attention must pass the forward **kwargs down, as in "
            "`ALL_ATTENTION_FUNCTIONS[config._attn_implementation](self, q, k, v, mask, ..., **kwargs)` "
            "(this function runs only inside the engine)"
        )
    q = query[0].transpose(0, 1)  # (T, Hq, D)
    k = key[0].transpose(0, 1)  # (T, Hkv, D)
    v = value[0].transpose(0, 1)  # (T, Hkv, Dv)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = paged_attention(q, k, v, kv_slot_of(module, batch), batch, scale, softcap, window, sinks)
    return out.unsqueeze(0), None  # (1, T, Hq, Dv)


def kv_slot_of(module: nn.Module, batch: ForwardBatch) -> int:
    """The cache slot of this call: the probe gave each attention call of a forward its own slot."""
    slots = getattr(module, "flab_kv_slots", None)
    if slots is None:
        raise RuntimeError(
            f"{type(module).__name__} called attention but did not during the load-time probe: it has no KV cache slot"
        )
    if len(slots) == 1:
        return slots[0]
    n = batch.attention_calls.get(id(module), 0)  # calls this module made in this forward
    batch.attention_calls[id(module)] = n + 1
    return slots[n % len(slots)]


def register_attention() -> str:
    """Register our attention function with transformers (idempotent) and return its name."""
    AttentionInterface.register(ATTENTION_NAME, fallback_lab_attention)
    return ATTENTION_NAME


def resolve_model_class(config: PretrainedConfig, trust_remote_code: bool) -> type:
    vlm = image_text_class(config)  # an image-text-to-text model (backend/models/vlm.py)
    if vlm is not None:
        return vlm
    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModelForCausalLM" in auto_map and trust_remote_code:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], config.name_or_path)
    if "AutoModelForCausalLM" in auto_map and type(config) not in AutoModelForCausalLM._model_mapping:
        raise UnsupportedModelError(
            f"{config.name_or_path} uses custom modeling code (auto_map); pass trust_remote_code=True to run it"
        )
    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise UnsupportedModelError(
            f"{type(config).__name__} (model_type={config.model_type!r}) has no causal-LM class in transformers; "
            "only decoder language models are supported"
        ) from None


def check_attention_support(cls: type) -> None:
    if not getattr(cls, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{cls.__name__} cannot run with the injected paged attention: its class does not set "
            "`_supports_attention_backend = True`. A model works here when (1) its attention modules call "
            "`ALL_ATTENTION_FUNCTIONS[config._attn_implementation](self, q, k, v, ..., **kwargs)` and pass the "
            "forward kwargs down, and (2) its PreTrainedModel class sets `_supports_attention_backend = True`."
        )


class TransformersModel(nn.Module):
    """Wraps an HF `*ForCausalLM`; `forward(batch)` returns logits of the sampled positions only."""

    impl = "transformers"

    def __init__(self, hf_config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool = False) -> None:
        super().__init__()
        cls = resolve_model_class(hf_config, trust_remote_code)
        check_attention_support(cls)
        self.is_image_text = image_text_class(hf_config) is not None
        # Gemma 3: the rule of its bidirectional spans (an image's tokens); other VLMs None, or refused with the reason
        self._bidirectional = check_image_text_class(cls, hf_config) if self.is_image_text else None
        self.attention_name = register_attention()
        # a VLM: our attention in its language model only, the vision tower keeps transformers' own
        self._attn = attention_implementations(hf_config, self.attention_name) if self.is_image_text else None
        config = copy.deepcopy(hf_config)  # from_config mutates the config it is given
        with torch.device("meta"):
            self.hf = cls._from_config(config, attn_implementation=self._attn or self.attention_name, dtype=dtype)
        self.hf.eval()
        self.config = self.hf.config
        self._cls, self._dtype, self._trust_remote_code = cls, dtype, trust_remote_code
        params = inspect.signature(self.hf.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self.kv_slots: tuple = ()  # set by probe_kv_layout once the weights are loaded
        self._image_refusal: str | None = None  # set by probe_images: why image requests cannot run

    def load_with_transformers(self, path, device: torch.device) -> None:
        """Load through transformers' own `from_pretrained` (for checkpoints that need its name conversions).

        transformers initialises weights the checkpoint lacks at random: such a checkpoint is refused instead."""
        hf, info = self._cls.from_pretrained(
            path,
            config=copy.deepcopy(self.config),
            attn_implementation=self._attn or self.attention_name,
            dtype=self._dtype,
            trust_remote_code=self._trust_remote_code,
            output_loading_info=True,
        )
        missing = sorted(info.get("missing_keys") or [])
        mismatched = [str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or []]
        if missing or mismatched:
            what = f"missing {missing[:4]}" if missing else f"with the wrong shape {mismatched[:4]}"
            raise UnsupportedModelError(
                f"{path}: {len(missing) or len(mismatched)} weights of {type(hf).__name__} are {what} in the "
                "checkpoint (transformers would initialise them at random); the checkpoint is incomplete or for "
                "another model: download it again or check the model name"
            )
        self.hf = hf.to(device).eval()
        self.config = self.hf.config

    def probe_kv_layout(self, device: torch.device) -> None:
        """Run the load-time probe forward: sets `kv_slots` (the cache layout) or refuses the model."""
        self.kv_slots = probe_kv_layout(self, device)
        if self.is_image_text:
            check_own_positions(self.hf, device, BATCH_KWARG)

    # --- image-text models (backend/models/vlm.py, backend/multimodal/) ---
    @property
    def image_token_id(self) -> int | None:
        return image_token_id(self.config)

    def image_input_refusal(self) -> str | None:
        return image_input_refusal(self.hf) or self._image_refusal

    def probe_images(self, processor, device: torch.device) -> None:
        """The load-time probe with a small image (after probe_kv_layout): image requests must call our attention
        as a text prompt does, else they are refused with what differed (backend/models/vlm.py)."""
        if image_input_refusal(self.hf) is None:
            self._image_refusal = image_probe_refusal(self.hf, processor, device, BATCH_KWARG, self.kv_slots)

    def mrope_positions(self, processed: dict) -> tuple[torch.Tensor, int] | None:
        return rope_index(self.hf, processed)

    def bidirectional_spans(self, processed: dict) -> tuple[tuple[int, int], ...]:
        """Prompt positions [start, end) whose tokens attend to each other both ways (Gemma 3: an image's)."""
        return bidirectional_spans(self._bidirectional, processed)

    @torch.inference_mode()
    def encode_images(self, inputs) -> torch.Tensor:  # -> (N, H)
        feats = encode_images(self.hf, inputs.tensors, self._dtype)
        n = inputs.placeholder_positions.numel()
        if feats.shape[0] != n:
            raise RuntimeError(f"the vision tower gave {feats.shape[0]} feature rows for {n} image tokens")
        return feats

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:  # -> (R, V)
        kwargs = {BATCH_KWARG: batch, "use_cache": False}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = batch.logits_indices
        ids = batch.input_ids[None]  # (1, T)
        positions = batch.positions[None] if batch.mrope_positions is None else batch.mrope_positions[:, None]
        if batch.embed_rows is None:
            out = self.hf(input_ids=ids, position_ids=positions, **kwargs)
        else:  # image features at the image tokens' rows, merged into the model's own input embeddings
            ids = ids.clone()
            ids[0, batch.embed_rows] = 0  # image token ids may lie outside the embedding table
            embeds = self.hf.get_input_embeddings()(ids)  # (1, T, H)
            values = batch.embed_values  # (K, H), or (K, 1 + D, H) with D deepstack layers' rows (Qwen3-VL)
            embeds[0, batch.embed_rows] = (values[:, 0] if values.dim() == 3 else values).to(embeds.dtype)
            if values.dim() == 3:
                extra = {BATCH_KWARG: batch, "use_cache": False}
                return deepstack_logits(
                    self.hf, embeds, positions, batch.embed_rows, values, batch.logits_indices, extra
                )
            out = self.hf(inputs_embeds=embeds, position_ids=positions, **kwargs)
        logits = out.logits[0]  # (R or T, V)
        return logits if self._logits_to_keep else logits[batch.logits_indices]
