"""The load-time probe with a small image (backend/models/vlm.image_probe_refusal): image requests must call our
attention exactly as a text prompt does; a model whose image path calls it otherwise keeps text requests and
refuses images with what differed, and one whose own code fails on the probe image says so."""

from __future__ import annotations

import functools

import pytest
import transformers

from backend import Engine, SamplingParams
from backend.core.errors import RequestError
from tests.models.vlm_reference import random_images

GREEDY = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)


def engine_for(path) -> Engine:
    return Engine(str(path), dtype="float32", device="cpu", kv_cache_memory_gb=0.05)


def test_an_accepted_family_passes_the_image_probe(tiny_vlm):
    with engine_for(tiny_vlm("llava")) as engine:
        assert engine.model.image_input_refusal() is None
        assert engine.describe()["images"]["accepted"] is True


def test_an_image_path_that_calls_attention_more_than_text_refuses_images_only(tiny_vlm, monkeypatch):
    """A forward that runs its language model twice when it gets pixels (as a cross-attention model would call
    attention where a text prompt does not): images refused with the counts, text still served."""
    cls = transformers.LlavaForConditionalGeneration
    real = cls.forward

    @functools.wraps(real)
    def twice_with_pixels(self, *args, **kwargs):
        if kwargs.get("pixel_values") is not None:
            real(self, *args, **kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", twice_with_pixels)
    with engine_for(tiny_vlm("llava")) as engine:
        refusal = engine.model.image_input_refusal()
        assert refusal is not None and "called attention" in refusal and "a text prompt:" in refusal
        with pytest.raises(RequestError, match="called attention") as err:
            engine.generate(["<image> Hi"], GREEDY, images=[random_images(1)])
        assert err.value.param == "images"
        assert engine.generate(["Hello there"], GREEDY)[0].token_ids  # text requests run


def test_a_model_whose_own_code_fails_on_the_probe_image_refuses_images(tiny_vlm, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("vision tower exploded")

    monkeypatch.setattr(transformers.LlavaModel, "get_image_features", broken)  # what the forward calls
    with engine_for(tiny_vlm("llava")) as engine:
        refusal = engine.model.image_input_refusal()
        assert "probe with a 32x32 image failed" in refusal and "vision tower exploded" in refusal
        assert engine.generate(["Hello there"], GREEDY)[0].token_ids
