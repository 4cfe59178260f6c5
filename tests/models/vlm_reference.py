"""HF generate()'s greedy tokens of an image-text model (fp32, one prompt at a time), text-only or with images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

from backend.loading.processor import load_processor


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")) for _ in range(n)]


def hf_vlm_greedy(path, prompts: list[str], max_new_tokens: int, images: list | None = None) -> list[list[int]]:
    """Greedy tokens of each prompt; `images` one entry per prompt (None, or a list of PIL images)."""
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    processor = None
    outs = []
    for i, prompt in enumerate(prompts):
        imgs = images[i] if images is not None else None
        if imgs:
            processor = processor or load_processor(path, AutoConfig.from_pretrained(path), False).processor
            inputs = dict(processor(text=[prompt], images=imgs, return_tensors="pt"))
        else:
            ids = tok(prompt, return_tensors="pt").input_ids
            inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        gen = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
        )
        outs.append(gen[0, inputs["input_ids"].shape[1] :].tolist())
    return outs
