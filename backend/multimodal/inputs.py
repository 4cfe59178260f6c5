"""An image-text request: the processor expands the prompt's image placeholders and prepares the pixels; what the
language model needs is kept per request (`ImageInputs`, on the Sequence) for every chunk and decode step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from backend.core.errors import RequestError
from backend.multimodal.images import load_image, pixels_hash

MAX_IMAGES_PER_REQUEST = 16
TEXT_KEYS = {"input_ids", "attention_mask", "token_type_ids"}  # processor outputs that are not the images'


@dataclass
class ImageInputs:
    """What one request's images give its language model."""

    tensors: dict[str, torch.Tensor]  # processor outputs for the vision tower (pixel_values, image_grid_thw, ...)
    placeholder_positions: torch.Tensor  # (N,) int64, prompt positions of the image tokens, ascending
    content_hash: int  # of the pixels: salts the request's KV block hashes
    num_images: int
    mrope_positions: torch.Tensor | None = None  # (3, L) the model's own get_rope_index over the prompt
    mrope_delta: int = 0  # position of a token after the prompt: its index + delta (all three rows)
    # prompt positions [start, end) whose tokens attend to each other both ways (Gemma 3: each image's tokens), from
    # the model (TransformersModel.bidirectional_spans); ascending, disjoint. The scheduler never splits one.
    bidirectional_spans: tuple[tuple[int, int], ...] = ()
    features: torch.Tensor | None = None  # (N, H) image features (deepstack: (N, 1 + D, H)), computed once at prefill
    num_encodes: int = 0  # how often the vision tower ran for this request (kept across preemptions: 1)
    _per_block: tuple = field(default=(), repr=False)  # (block size, tokens_per_block's answer), computed once

    def tokens_per_block(self, block_size: int) -> tuple[tuple[int, int], ...]:
        """(block index in the request, image tokens it holds) for the blocks that hold any (the KV map's read-out,
        taken every step: computed once per request)."""
        if not self._per_block or self._per_block[0] != block_size:
            idx, counts = torch.unique(self.placeholder_positions // block_size, return_counts=True)
            self._per_block = (block_size, tuple(zip(idx.tolist(), counts.tolist())))
        return self._per_block[1]


def as_image_list(images: object) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def prepare_image_request(model: nn.Module, processor, prompt: object, images: object) -> tuple[list[int], ImageInputs]:
    """The prompt's token ids (placeholders expanded) and its ImageInputs; RequestError (param "images" or the
    image's field) for bad input.

    `model` is the loaded model (a TransformersModel of an image-text model), `processor` its LoadedProcessor."""
    check_takes_images(model, processor)
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(
            "a request with images needs a text prompt (a non-empty string) holding their placeholders", param="prompt"
        )
    items = as_image_list(images)
    if not items:
        raise RequestError("images: an empty list; give at least one image, or leave images out", param="images")
    if len(items) > MAX_IMAGES_PER_REQUEST:
        raise RequestError(f"images: {len(items)} images; at most {MAX_IMAGES_PER_REQUEST} per request", param="images")
    refusal = model.image_input_refusal()
    if refusal is not None:
        raise RequestError(f"images: {refusal}", param="images")
    pil = [load_image(x, f"images[{i}]") for i, x in enumerate(items)]
    out = expand_prompt(processor.processor, prompt, pil)
    ids = out["input_ids"][0]  # (L,)
    positions = (ids == model.image_token_id).nonzero().flatten()  # (N,)
    if positions.numel() == 0:
        raise RequestError(
            f"images: the prompt holds no image placeholder for its {len(pil)} image(s); put "
            f"{getattr(processor.processor, 'image_token', 'the image token')!r} where each image goes",
            param="images",
        )
    check_image_token_count(processor.processor, pil, positions.numel())
    tensors = {k: v for k, v in out.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)}
    inputs = ImageInputs(tensors, positions, pixels_hash(tensors), len(pil))
    mrope = model.mrope_positions(out)
    if mrope is not None:
        inputs.mrope_positions, inputs.mrope_delta = mrope
    inputs.bidirectional_spans = model.bidirectional_spans(out)
    return ids.tolist(), inputs


def check_image_token_count(proc, images: list, found: int) -> None:
    """RequestError when the expanded prompt holds another number of image tokens than its images give features
    (more images than placeholders: some processors of older transformers expand one placeholder only and leave the
    mismatch to the model's forward, which would fail the whole step). The count per image is the processor's own
    `_get_num_multimodal_tokens` (what vLLM asks it too); a processor without it is left to its own checks."""
    count = getattr(proc, "_get_num_multimodal_tokens", None)
    if count is None:
        return
    try:
        per_image = list(count(image_sizes=[(im.height, im.width) for im in images]).num_image_tokens or [])
    except Exception:  # noqa: BLE001 - the processor cannot tell: its own checks and the model's decide
        return
    if len(per_image) == len(images) and sum(per_image) != found:
        token = getattr(proc, "image_token", "the image token")
        raise RequestError(
            f"images: {len(images)} image(s) need {sum(per_image)} image tokens, the prompt's placeholders expanded to "
            f"{found}; the prompt must hold one image placeholder ({token!r}, or the model's chat template) per image",
            param="images",
        )


def check_takes_images(model: nn.Module, processor) -> None:
    """RequestError (param "images") when this model cannot take images here, with the reason."""
    if not getattr(model, "is_image_text", False):
        raise RequestError("images: this model takes no images (it is a language model); send text only", "images")
    if processor is None or processor.processor is None:
        why = processor.unavailable if processor is not None else "it has no processor"
        raise RequestError(f"images: this model cannot take images here: {why}; send text only", param="images")


def expand_prompt(proc, prompt: str, images: list) -> dict:
    """The processor's outputs for one prompt and its decoded images: input_ids (1, L) with each image's placeholder
    expanded to its image tokens, and the vision tower's inputs. A prompt the template began with the tokenizer's
    BOS gets no second one (transformers' processor apply_chat_template rule)."""
    bos = getattr(getattr(proc, "tokenizer", None), "bos_token", None)
    options = {"add_special_tokens": False} if bos and prompt.startswith(bos) else {}
    try:
        return proc(text=[prompt], images=images, return_tensors="pt", **options)
    except (ValueError, TypeError, IndexError) as e:
        token = getattr(proc, "image_token", "the image token")
        raise RequestError(
            f"images: the processor refused the prompt with {len(images)} image(s) ({str(e)[:300]}); the prompt must "
            f"hold one image placeholder ({token!r}, or the model's chat template) per image",
            param="images",
        ) from None


def describe_images(processor) -> dict | None:
    """What the engine's describe() says about image inputs: None for a language model."""
    if processor is None:
        return None
    if processor.processor is None:
        return dict(accepted=False, reason=processor.unavailable)
    proc = processor.processor
    return dict(
        accepted=True,
        processor=type(proc).__name__,
        image_token=getattr(proc, "image_token", None),
        max_images_per_request=MAX_IMAGES_PER_REQUEST,
    )
