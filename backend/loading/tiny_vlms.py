"""Write random-weight image-text-to-text checkpoints (VLMs) of real families, with their processors, into a folder.

Like tiny_models.py for language models: config.json, model.safetensors, the tokenizer (byte-level BPE with the
family's image tokens added) and the processor files, so the folder loads through the same path as a Hub snapshot.
Shapes are tiny (32x32 images, a 2-layer language model). Zero-initialised projections get random values and
embeddings are untied, or an image would have no effect on the output (/work/shared/design.md).

    python -m backend.tools.tiny_vlms llava /tmp/tiny-llava   (the command line: backend/tools/tiny_vlms.py)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig, PreTrainedTokenizerFast

from backend.loading.processor import without_video
from backend.loading.tiny_models import build_tokenizer

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
IMAGE_SIZE = 32
VISION = dict(  # a ViT-style tower (CLIP, SigLIP, Pixtral, Idefics3's): the families add their own keys
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=IMAGE_SIZE,
    patch_size=8,
)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}{% if part['type'] == 'image' %}{{ IMAGE }}{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|eos|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """How to build one family: its model_type, extra tokens, config and processor (None: refused before use)."""

    model_type: str
    image_text: str  # what stands for one image in a prompt (the processor expands it)
    tokens: tuple[str, ...]
    config: Callable[[PreTrainedTokenizerFast], PretrainedConfig]
    processor: Callable[[PreTrainedTokenizerFast, str], object] | None
    named_tokens: tuple[tuple[str, str], ...] = ()  # tokenizer attributes the processor reads (image_token, ...)
    amplify: tuple[tuple[str, float], ...] = ()  # (name part, factor): weights scaled up so that their path matters


def _ids(tok: PreTrainedTokenizerFast, *names: str) -> list[int]:
    return [tok.convert_tokens_to_ids(n) for n in names]


def _text(tok: PreTrainedTokenizerFast, model_type: str, **extra) -> dict:
    return dict(
        model_type=model_type,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TEXT,
        **extra,
    )


def _llava_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    vision = dict(VISION, model_type="clip_vision_model", projection_dim=32)
    (image,) = _ids(tok, "<image>")
    return AutoConfig.for_model("llava", text_config=_text(tok, "llama"), vision_config=vision, image_token_id=image)


def _llava_processor(tok: PreTrainedTokenizerFast, template: str):
    size = dict(height=IMAGE_SIZE, width=IMAGE_SIZE)
    images = transformers.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=size)
    return transformers.LlavaProcessor(
        images,
        tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=template,
    )


def _qwen2_vl_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    image, video, start = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>")
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])  # sums to head_dim / 2
    vision = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, patch_size=14, spatial_merge_size=2)
    text = _text(tok, "qwen2_vl_text", rope_parameters=rope)
    return AutoConfig.for_model(
        "qwen2_vl",
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
    )


def _qwen2_vl_processor(tok: PreTrainedTokenizerFast, template: str):
    pixels = 56 * 56  # a 4x4 patch grid: 2x2 merged tokens, whose M-RoPE positions advance by 2 (delta -2)
    images = transformers.Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2)
    return without_video(transformers.Qwen2VLProcessor)(image_processor=images, tokenizer=tok, chat_template=template)


def _qwen2_5_vl_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    image, video, start = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>")
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        window_size=56,  # window attention over 2x2 merged patches; block 1 attends fully
        fullatt_block_indexes=[1],
    )
    return AutoConfig.for_model(
        "qwen2_5_vl",
        text_config=_text(tok, "qwen2_5_vl_text", rope_parameters=rope),
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
    )


def _qwen2_5_vl_processor(tok: PreTrainedTokenizerFast, template: str):
    pixels = 56 * 84
    images = transformers.Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2)
    processor = without_video(transformers.Qwen2_5_VLProcessor)
    return processor(image_processor=images, tokenizer=tok, chat_template=template)


def _qwen3_vl_processor(tok: PreTrainedTokenizerFast, template: str):
    pixels = 56 * 56  # a 4x4 patch grid: 2x2 merged tokens, whose M-RoPE positions advance by 2 (delta -2)
    images = transformers.Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2)
    return without_video(transformers.Qwen3VLProcessor)(image_processor=images, tokenizer=tok, chat_template=template)


def _qwen3_vl_config(tok: PreTrainedTokenizerFast, moe: bool = False) -> PretrainedConfig:
    """Qwen3-VL: interleaved M-RoPE; deepstack: the vision tower's block 0 features added after the language model's
    first layer (MoE: 4 experts, 2 per token)."""
    image, video, start, end = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3], mrope_interleaved=True)
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32) if moe else {}
    text = _text(tok, "qwen3_vl_moe_text" if moe else "qwen3_vl_text", rope_parameters=rope, **experts)
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    return AutoConfig.for_model(
        "qwen3_vl_moe" if moe else "qwen3_vl",
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )


def _qwen3_vl_moe_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    return _qwen3_vl_config(tok, moe=True)


GLM_TOKENS = (
    "<|image|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|video|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)


def _glm4v_moe_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    image, start, end, video, vstart, vend = _ids(tok, *GLM_TOKENS)
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 2, 1], partial_rotary_factor=0.5)
    text = _text(
        tok,
        "glm4v_moe_text",
        rope_parameters=rope,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        image_size=56,
    )
    return AutoConfig.for_model(
        "glm4v_moe",
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        image_start_token_id=start,
        image_end_token_id=end,
        video_token_id=video,
        video_start_token_id=vstart,
        video_end_token_id=vend,
    )


def _glm4v_processor(tok: PreTrainedTokenizerFast, template: str):
    pixels = 56 * 56
    images = transformers.Glm4vImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14, merge_size=2
    )
    return without_video(transformers.Glm4vProcessor)(image_processor=images, tokenizer=tok, chat_template=template)


def _mistral3_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    vision = dict(VISION, model_type="pixtral", head_dim=16)
    (image,) = _ids(tok, "[IMG]")
    return AutoConfig.for_model(
        "mistral3",
        text_config=_text(tok, "mistral"),
        vision_config=vision,
        image_token_id=image,
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )


@dataclass(frozen=True)
class ProcessorFiles:
    """A processor's files written without building it (PixtralProcessor requires torchvision to be built)."""

    processor_class: str
    image_processor: object
    options: dict

    def save_pretrained(self, path: Path) -> None:
        self.image_processor.save_pretrained(path)
        config = dict(processor_class=self.processor_class, **self.options)
        (Path(path) / "processor_config.json").write_text(json.dumps(config, indent=1))


def _mistral3_processor(tok: PreTrainedTokenizerFast, template: str):
    images = transformers.PixtralImageProcessorPil(size={"longest_edge": IMAGE_SIZE}, patch_size=8)
    options = dict(patch_size=8, spatial_merge_size=2)
    try:
        return transformers.PixtralProcessor(images, tok, chat_template=template, **options)
    except ImportError:  # torchvision missing: the files a Mistral 3 checkpoint ships, as they are
        return ProcessorFiles("PixtralProcessor", images, options)


def _idefics3_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    vision = dict(VISION)
    (image,) = _ids(tok, "<image>")
    return AutoConfig.for_model(
        "idefics3", text_config=_text(tok, "llama"), vision_config=vision, image_token_id=image, scale_factor=2
    )


# Idefics3 / SmolVLM: an image split into sub-images of IMAGE_SIZE plus the whole one, each with its row / col token
SPLIT_IMAGES = dict(
    size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}, do_image_splitting=True
)
IDEFICS3_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>") + tuple(
    f"<row_{r}_col_{c}>" for r in range(1, 3) for c in range(1, 3)
)


def _idefics3_processor(tok: PreTrainedTokenizerFast, template: str):
    images = transformers.Idefics3ImageProcessorPil(**SPLIT_IMAGES)
    return transformers.Idefics3Processor(images, tok, image_seq_len=4, chat_template=template)


def _smolvlm_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    """SmolVLM: Idefics3's architecture (pixel shuffle, image splitting) under its own model type and processor."""
    config = _idefics3_config(tok).to_dict()
    config.pop("model_type", None)
    return AutoConfig.for_model("smolvlm", **config)


def _smolvlm_processor(tok: PreTrainedTokenizerFast, template: str):
    images = transformers.SmolVLMImageProcessorPil(**SPLIT_IMAGES)
    return without_video(transformers.SmolVLMProcessor)(images, tok, image_seq_len=4, chat_template=template)


def _gemma3_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    vision = dict(VISION, model_type="siglip_vision_model")
    text = _text(
        tok,
        "gemma3_text",
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=4,  # sharper attention than the default 1/16 scale: an image's bidirectional span matters
    )
    image, boi, eoi = _ids(tok, "<image_soft_token>", "<start_of_image>", "<end_of_image>")
    return AutoConfig.for_model(
        "gemma3",
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_id=image,
        boi_token_id=boi,
        eoi_token_id=eoi,
    )


def _gemma3_processor(tok: PreTrainedTokenizerFast, template: str):
    images = transformers.Gemma3ImageProcessorPil(size=dict(height=IMAGE_SIZE, width=IMAGE_SIZE))
    return transformers.Gemma3Processor(images, tok, image_seq_length=4, chat_template=template)


def _paligemma_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    vision = dict(VISION, model_type="siglip_vision_model", projection_dim=TEXT["hidden_size"])
    text = _text(tok, "gemma", query_pre_attn_scalar=4)
    (image,) = _ids(tok, "<image>")
    return AutoConfig.for_model(
        "paligemma", text_config=text, vision_config=vision, image_token_id=image, projection_dim=TEXT["hidden_size"]
    )


def _paligemma_processor(tok: PreTrainedTokenizerFast, template: str):
    images = transformers.SiglipImageProcessorPil(size=dict(height=IMAGE_SIZE, width=IMAGE_SIZE))
    images.image_seq_length = (IMAGE_SIZE // 8) ** 2  # one token per patch
    return transformers.PaliGemmaProcessor(images, tok, chat_template=template)


GEMMA3_TOKENS = (
    ("image_token", "<image_soft_token>"),
    ("boi_token", "<start_of_image>"),
    ("eoi_token", "<end_of_image>"),
)
QWEN_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
FAMILIES: dict[str, Family] = {
    "llava": Family("llava", "<image>", ("<image>",), _llava_config, _llava_processor),
    "qwen2_vl": Family(
        "qwen2_vl", "<|vision_start|><|image_pad|><|vision_end|>", QWEN_TOKENS, _qwen2_vl_config, _qwen2_vl_processor
    ),
    "qwen2_5_vl": Family(
        "qwen2_5_vl",
        "<|vision_start|><|image_pad|><|vision_end|>",
        QWEN_TOKENS,
        _qwen2_5_vl_config,
        _qwen2_5_vl_processor,
    ),
    "qwen3_vl": Family(  # deepstack: image features added inside the language model's first layer
        "qwen3_vl",
        "<|vision_start|><|image_pad|><|vision_end|>",
        QWEN_TOKENS,
        _qwen3_vl_config,
        _qwen3_vl_processor,
        amplify=(("deepstack_merger_list", 3.0),),  # deepstack rows large enough to change the greedy tokens
    ),
    "qwen3_vl_moe": Family(
        "qwen3_vl_moe",
        "<|vision_start|><|image_pad|><|vision_end|>",
        QWEN_TOKENS,
        _qwen3_vl_moe_config,
        _qwen3_vl_processor,
    ),
    "glm4v_moe": Family(
        "glm4v_moe",
        "<|begin_of_image|><|image|><|end_of_image|>",
        GLM_TOKENS,
        _glm4v_moe_config,
        _glm4v_processor,
    ),
    "mistral3": Family(
        "mistral3", "[IMG]", ("[IMG]", "[IMG_BREAK]", "[IMG_END]"), _mistral3_config, _mistral3_processor
    ),
    "idefics3": Family(
        "idefics3",
        "<image>",
        IDEFICS3_TOKENS,
        _idefics3_config,
        _idefics3_processor,
    ),
    "smolvlm": Family(  # Idefics3's architecture; its processor writes numbers with num2words
        "smolvlm",
        "<image>",
        IDEFICS3_TOKENS,
        _smolvlm_config,
        _smolvlm_processor,
    ),
    "paligemma": Family(  # its whole prompt (images and text prefix) attends both ways (one bidirectional span)
        "paligemma", "<image>", ("<image>",), _paligemma_config, _paligemma_processor, (("image_token", "<image>"),)
    ),
    "gemma3": Family(  # each image's 4 tokens attend to each other both ways (bidirectional spans)
        "gemma3",
        "<start_of_image>",
        tuple(t for _, t in GEMMA3_TOKENS),
        _gemma3_config,
        _gemma3_processor,
        GEMMA3_TOKENS,
    ),
}


def _randomize_zero_parameters(model: torch.nn.Module, std: float) -> None:
    """Give parameters transformers initialised to all zeros (Gemma 3's image projection, ...) random values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, std)


def _amplify(model: torch.nn.Module, amplify: tuple[tuple[str, float], ...]) -> None:
    with torch.no_grad():
        for part, factor in amplify:
            for name, p in model.named_parameters():
                if part in name:
                    p.mul_(factor)


def build_tiny_vlm(family: str, path: str | Path, seed: int = 0, init_std: float = 0.1) -> Path:
    """Write a random-weight `family` VLM with its tokenizer and processor (where it has one) to `path`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny VLM family {family!r}; known: {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(spec.tokens)})
    if spec.named_tokens:  # the same tokenizer, with the attributes its processor reads (tok.image_token, ...)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=tok.backend_tokenizer,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
            pad_token=tok.pad_token,
            chat_template=tok.chat_template,
            extra_special_tokens=dict(spec.named_tokens),
        )
    config = spec.config(tok)
    config.initializer_range = init_std
    config.get_text_config().initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _randomize_zero_parameters(model, init_std)
    _amplify(model, spec.amplify)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if spec.processor is not None:
        spec.processor(tok, CHAT_TEMPLATE.replace("IMAGE", repr(spec.image_text))).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("path")
    args = parser.parse_args()
    print(build_tiny_vlm(args.family, args.path))


if __name__ == "__main__":
    main()
