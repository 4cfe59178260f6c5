"""Image-text-to-text models (VLMs) through the transformers fallback: which class, where our attention goes.

A VLM's config holds its language model's config as a sub-config (`get_text_config()`); its class comes from
transformers' image-text-to-text mapping (`AutoModelForImageTextToText`). Our paged attention is injected into the
language model only (the text config's `_attn_implementation`); the vision tower keeps transformers' default
(sdpa / eager) and runs once per image. A family whose language model needs an attention our paged attention
cannot express is refused here, at load, with the reason.

Bidirectional attention among some prompt tokens is expressed as spans (`BidirectionalRule`): positions [start, end)
of one request whose tokens attend to each other both ways, which the paged attention honours
(flab_kernels/attention_args.BidirectionalSpan) and the scheduler never splits across chunks. Gemma 3 lets each
image's tokens attend to each other (read from the processor's `token_type_ids` at the prefill by the model's own
`get_block_sequence_ids_for_mask`); other families with bidirectional masks are refused with the reason.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoModelForImageTextToText, PretrainedConfig

from backend.core.errors import RequestError, UnsupportedModelError

# Mask arguments of transformers' masking_utils that make some tokens attend bidirectionally (an image's tokens, a
# prompt prefix). The paged attention applies causality itself and never sees the mask transformers would build.
BIDIRECTIONAL_MASK_ARGS = ("block_sequence_ids=", "or_mask_function=", "token_type_ids_mask_function")


def image_text_class(config: PretrainedConfig) -> type | None:
    """The transformers image-text-to-text class of `config` (None: not an image-text model)."""
    if not _has_text_subconfig(config):
        return None
    mapping = AutoModelForImageTextToText._model_mapping
    return mapping[type(config)] if type(config) in mapping else None


def is_image_text_config(config: PretrainedConfig) -> bool:
    return image_text_class(config) is not None


def _has_text_subconfig(config: PretrainedConfig) -> bool:
    try:
        return config.get_text_config() is not config
    except ValueError:  # several text configs
        return False


def attention_implementations(config: PretrainedConfig, ours: str) -> dict:
    """The `attn_implementation` dict that puts `ours` on the text config only (nested where it is nested), leaving
    every other sub-config (the vision tower, the projector) at transformers' default."""
    path = _text_config_path(config, config.get_text_config())
    if path is None:
        raise UnsupportedModelError(
            f"{type(config).__name__}: its text config is not among its sub-configs ({sorted(config.sub_configs)}), "
            "so the paged attention cannot be injected into its language model alone"
        )
    value: str | dict = ours
    for key in reversed(path):
        value = {key: value}
    return value  # type: ignore[return-value]


def _text_config_path(config: PretrainedConfig, text: PretrainedConfig) -> list[str] | None:
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is text:
            return [key]
        if isinstance(sub, PretrainedConfig):
            rest = _text_config_path(sub, text)
            if rest is not None:
                return [key, *rest]
    return None


def bidirectional_reason(cls: type) -> str | None:
    """Why the language model of `cls` attends bidirectionally somewhere (None: causal everywhere, as far as its
    modeling code says). Read from the mask arguments its modeling module passes to transformers' masking_utils."""
    module = sys.modules.get(cls.__module__)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return None
    used = [arg.rstrip("=") for arg in BIDIRECTIONAL_MASK_ARGS if arg in source]
    if not used:
        return None
    return (
        f"{cls.__name__} lets some tokens attend bidirectionally (an image's tokens or the prompt prefix, through "
        f"{', '.join(used)} in its attention mask); the paged attention is causal and builds no transformers mask, "
        "so its outputs would differ from transformers'"
    )


@dataclass(frozen=True)
class BidirectionalRule:
    """How a family's modeling code groups prompt tokens that attend to each other both ways at the prefill."""

    what: str  # which tokens, in words
    key: str  # the processor output the groups come from
    group_ids: Callable[[torch.Tensor], torch.Tensor] | None  # (1, L) -> (1, L) group per token, -1 = causal; None:
    # the config makes this model causal everywhere


def _own_groups(cls: type) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The modeling module's own `get_block_sequence_ids_for_mask`: each run of image tokens a group."""
    fn = getattr(sys.modules.get(cls.__module__), "get_block_sequence_ids_for_mask", None)
    return fn if callable(fn) else None


def bidirectional_rule(cls: type, config: PretrainedConfig) -> BidirectionalRule | None:
    """The rule of a family whose bidirectional attention the paged attention runs as spans (None: not one)."""
    mode = getattr(config.get_text_config(), "use_bidirectional_attention", None)
    groups = _own_groups(cls)
    if cls.__name__ == "Gemma3ForConditionalGeneration" and not mode and groups is not None:
        return BidirectionalRule("the tokens of one image", "token_type_ids", groups)  # mode: all tokens (embedding)
    if cls.__name__ == "Gemma4ForConditionalGeneration" and mode in (None, "vision") and groups is not None:
        # "vision": each image's tokens both ways; None (smaller Gemma 4 models): causal everywhere
        fn = (lambda ids: groups(ids, ids.device)) if mode == "vision" else None
        return BidirectionalRule("the tokens of one image", "mm_token_type_ids", fn)
    return None


# Why a family with bidirectional attention is refused although its spans could be expressed.
NO_REFERENCE = {
    "PaliGemmaForConditionalGeneration": (
        "PaliGemma's language model declares its attention non-causal (its text config's use_bidirectional_attention "
        "is True by default): where transformers skips the mask (sdpa, no padding: a text-only prompt) the whole "
        "prompt attends both ways, with eager attention causally, so a text-only request has no one reference to "
        "match (its image prompts, whose prefix attends both ways, would be one bidirectional span)"
    ),
}


def check_image_text_class(cls: type, config: PretrainedConfig) -> BidirectionalRule | None:
    """Refuse a VLM class whose language model the paged attention cannot run exactly; the rule of its bidirectional
    spans where it has some."""
    reason = bidirectional_reason(cls)
    if reason is None:
        return None
    rule = bidirectional_rule(cls, config)
    if rule is None:
        why = NO_REFERENCE.get(
            cls.__name__, "Only Gemma 3's and Gemma 4's spans (the tokens of one image) are supported"
        )
        raise UnsupportedModelError(f"{reason}. {why}")
    return rule


def bidirectional_spans(rule: BidirectionalRule | None, processed: dict) -> tuple[tuple[int, int], ...]:
    """The prompt positions [start, end) of each group of tokens that attend to each other both ways, from the
    processor's token_type_ids (none given: causal, as in the modeling code)."""
    token_type_ids = processed.get(rule.key) if rule is not None else None
    if rule is None or rule.group_ids is None or token_type_ids is None:
        return ()
    groups = rule.group_ids(token_type_ids)[0].tolist()  # (L,)
    spans: list[tuple[int, int]] = []
    for pos, g in enumerate(groups):
        if g < 0:
            continue
        if spans and groups[pos - 1] == g:
            spans[-1] = (spans[-1][0], pos + 1)
        elif g in groups[:pos]:
            raise RequestError(
                "images: the processor's token_type_ids put tokens apart from each other in one bidirectional group; "
                "the paged attention takes contiguous groups only",
                param="images",
            )
        else:
            spans.append((pos, pos + 1))
    return tuple((a, b) for a, b in spans if b - a > 1)


def image_token_id(config: PretrainedConfig) -> int | None:
    """The id of the token that stands for one image feature in the prompt."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def image_input_refusal(hf) -> str | None:
    """Why this model's image requests cannot run exactly (None: they can)."""
    vision = getattr(hf.config, "vision_config", None)
    if getattr(vision, "deepstack_visual_indexes", None) and deepstack_language_model(hf) is None:
        return (
            f"{type(hf).__name__} adds image features inside its language model's layers (deepstack), but its "
            "language model takes no `deepstack_visual_embeds`; send text only"
        )
    if image_token_id(hf.config) is None or not callable(getattr(hf, "get_image_features", None)):
        return f"{type(hf).__name__} names no image token or has no get_image_features"
    lm = getattr(getattr(hf, "model", None), "language_model", None)
    if lm is not None and "per_layer_inputs" in inspect.signature(lm.forward).parameters:
        return (
            f"{type(hf).__name__}'s language model takes per-layer inputs that its forward computes from the input "
            "ids (image tokens masked), which the engine's merged input embeddings do not carry; send text only"
        )
    return None


def deepstack_language_model(hf) -> torch.nn.Module | None:
    """The language model of a deepstack VLM (Qwen3-VL: image features added to the hidden states after its first
    layers) when it takes them as arguments (`visual_pos_masks`, `deepstack_visual_embeds`)."""
    lm = getattr(getattr(hf, "model", None), "language_model", None)
    if lm is None or "deepstack_visual_embeds" not in inspect.signature(lm.forward).parameters:
        return None
    return lm


def deepstack_logits(
    hf,
    embeds: torch.Tensor,  # (1, T, H) input embeddings, image rows merged
    positions: torch.Tensor,  # (1, T) or (3, 1, T)
    rows: torch.Tensor,  # (K,) ascending token indices of the step's image tokens
    values: torch.Tensor,  # (K, 1 + D, H) per image token: its feature and its D deepstack layers' rows
    logits_indices: torch.Tensor,  # (R,)
    kwargs: dict,
) -> torch.Tensor:  # (R, V)
    """A step with deepstack image rows: the language model's own forward adds each deepstack layer's rows to the
    hidden states of the image tokens after that layer (as the model's forward does once it merged the features),
    then its head on the sampled rows (as the model's forward does with logits_to_keep)."""
    mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)  # (1, T)
    mask[0, rows] = True
    deep = [values[:, 1 + i].to(embeds.dtype) for i in range(values.shape[1] - 1)]  # D x (K, H)
    out = deepstack_language_model(hf)(
        inputs_embeds=embeds, position_ids=positions, visual_pos_masks=mask, deepstack_visual_embeds=deep, **kwargs
    )
    return hf.lm_head(out.last_hidden_state[0, logits_indices])


def _accepted(fn, values: dict) -> dict:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in values.items() if k in params}


def _feature_rows(feats) -> torch.Tensor:  # a tensor or one per image -> (N, H)
    if isinstance(feats, (list, tuple)):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], dim=0)
    return feats.reshape(-1, feats.shape[-1])


def encode_images(hf, tensors: dict, dtype) -> torch.Tensor:  # -> (N, H) or, deepstack, (N, 1 + D, H)
    """The image features of one request from the model's own `get_image_features`, one row per image token; a
    deepstack model's (Qwen3-VL) with its D deepstack layers' rows beside each feature."""
    fn = hf.get_image_features
    kwargs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    kwargs = {k: v.to(hf.device) for k, v in _accepted(fn, kwargs).items()}
    out = fn(**kwargs)
    feats = _feature_rows(getattr(out, "pooler_output", out))
    deep = getattr(out, "deepstack_features", None)
    if deep:
        return torch.stack([feats, *(_feature_rows(d) for d in deep)], dim=1)  # (N, 1 + D, H)
    return feats


def rope_index(hf, processed: dict) -> tuple[torch.Tensor, int] | None:
    """(M-RoPE positions (3, L), delta) of one processed prompt from the model's own `get_rope_index`; None for a
    model without M-RoPE."""
    owner = getattr(hf, "model", hf)
    fn = getattr(owner, "get_rope_index", None)
    if not callable(fn):
        return None
    values = {k: v for k, v in processed.items() if k != "attention_mask"}
    positions, delta = fn(**_accepted(fn, values))  # (3, 1, L), (1, 1)
    return positions[:, 0].cpu(), int(delta.reshape(-1)[0])


def check_own_positions(hf, device, batch_kwarg: str) -> None:
    """Refuse a language model that computes its own positions differently from the 0-based position_ids the engine
    passes (Kosmos-2.5: sinusoidal positions offset by its padding index when none are given, as in generate())."""
    from backend.models.kv_layout import PROBE_TOKENS, KVProbe

    vocab = int(getattr(hf.config.get_text_config(), "vocab_size", 0) or 1)
    ids = ((torch.arange(PROBE_TOKENS, device=device) + vocab // 2) % vocab)[None]  # (1, T) ordinary tokens
    with torch.inference_mode():
        given = hf(
            input_ids=ids,
            position_ids=torch.arange(PROBE_TOKENS, device=device)[None],
            use_cache=False,
            **{batch_kwarg: KVProbe()},
        ).logits
        try:
            own = hf(input_ids=ids, use_cache=False, **{batch_kwarg: KVProbe()}).logits
        except Exception:  # the model needs position_ids given: nothing of its own to compare
            return
    if not torch.allclose(given.float(), own.float(), rtol=1e-3, atol=1e-3):
        raise UnsupportedModelError(
            f"{type(hf).__name__} computes its own token positions (from the input ids when none are given, as in "
            "generate()) differently from 0-based position ids, which the engine passes; its outputs would differ"
        )


PROBE_IMAGE_SIDE = 32  # pixels of the load-time probe's image (the processor resizes it to the model's own size)


MARK_BEFORE, MARK_AFTER = "[[flab-before]]", "[[flab-after]]"  # around an image part, to find its placeholder text


def placeholder_text(processor) -> str:
    """What stands for one image in a prompt for this processor: its chat template's rendering of an image part
    (Qwen2-VL: `<|vision_start|><|image_pad|><|vision_end|>`), else its image token (`<image>`)."""
    token = str(getattr(processor, "image_token", None) or "<image>")
    if not getattr(processor, "chat_template", None):
        return token
    parts = [{"type": "text", "text": MARK_BEFORE}, {"type": "image"}, {"type": "text", "text": MARK_AFTER}]
    try:
        text = processor.apply_chat_template([{"role": "user", "content": parts}], tokenize=False)
    except Exception:  # a template that wants other message shapes: the plain token
        return token
    if not isinstance(text, str) or MARK_BEFORE not in text or MARK_AFTER not in text:
        return token
    between = text.split(MARK_BEFORE, 1)[1].split(MARK_AFTER, 1)[0]
    return between if token in between else token


def image_prompt(processor, text: str, use_chat_template: bool) -> str:
    """The prompt text of a request with one image: the processor's chat template over an image part and `text` when
    asked (and it has one), else `text` after the model's image placeholder; a `text` that already holds the
    placeholder is kept as it is (the app's prompts, the load-time probe's)."""
    token = str(getattr(processor, "image_token", None) or "")
    if token and token in text:
        return text
    if use_chat_template and getattr(processor, "chat_template", None):
        message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        rendered = processor.apply_chat_template([message], add_generation_prompt=True, tokenize=False)
        if isinstance(rendered, str) and token in rendered:
            return rendered
    return placeholder_text(processor) + text


def image_probe_refusal(hf, proc, device, batch_kwarg: str, text_slots: tuple) -> str | None:
    """Why image requests cannot run exactly (None: they can), from one forward of the model's own code on a small
    image with the probe as its attention: every attention call must be one the text probe saw, in the same order
    and with the same heads and head sizes (image features enter as input embeddings only). A model whose image path
    calls attention otherwise (cross-attention to image states, extra layers) keeps text requests and refuses
    images with what differed."""
    from PIL import Image

    from backend.models.kv_layout import KVProbe

    image = Image.new("RGB", (PROBE_IMAGE_SIDE, PROBE_IMAGE_SIDE), (128, 96, 64))
    probe = KVProbe()
    try:
        processed = proc(text=[image_prompt(proc, "Describe it.", True)], images=[image], return_tensors="pt")
        inputs = {k: v.to(device) for k, v in processed.items() if isinstance(v, torch.Tensor)}
        inputs = _accepted(hf.forward, {k: v for k, v in inputs.items() if k != "attention_mask"})
        with torch.inference_mode():
            hf(**inputs, use_cache=False, **{batch_kwarg: probe})
    except Exception as e:  # noqa: BLE001 - the model's own code refused the probe image: say so, keep text
        side = PROBE_IMAGE_SIDE
        return f"the load-time probe with a {side}x{side} image failed ({type(e).__name__}: {str(e)[:200]})"
    seen = [(c.num_kv_heads, c.k_head_dim, c.v_head_dim) for c in probe.calls]
    text = [(s.num_kv_heads, s.k_head_dim, s.v_head_dim) for s in text_slots]
    unknown = [c for c in probe.calls if getattr(c.module, "flab_kv_slots", None) is None]
    if seen != text or unknown:
        return (
            f"with an image its language model called attention {len(seen)} times (a text prompt: {len(text)})"
            + (f", {len(unknown)} of them in modules a text prompt never runs" if unknown else "")
            + "; the paged KV cache holds only what a text prompt's calls keep"
        )
    return None
