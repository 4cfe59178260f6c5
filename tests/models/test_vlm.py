"""Image-text-to-text models (VLMs) through the transformers fallback (backend/models/vlm.py): loaded with our paged
attention in the language model only and their processor; text-only requests equal HF generate() on the same
weights (fp32, CPU); families the paged attention cannot run exactly are refused at load with the reason."""

from __future__ import annotations

import pytest

from backend import Engine, SamplingParams
from backend.core.errors import UnsupportedModelError
from backend.models.transformers import ATTENTION_NAME
from tests.helpers import PROMPTS
from tests.models.vlm_reference import hf_vlm_greedy

N_NEW = 8
SLOW = pytest.mark.slow
EXACT_FAMILIES = [
    "llava",
    "qwen2_vl",  # M-RoPE (text-only: three equal position rows)
    pytest.param("qwen2_5_vl", marks=SLOW),
    pytest.param("idefics3", marks=SLOW),
    pytest.param("mistral3", marks=SLOW),  # its processor needs torchvision: text-only here
    pytest.param("qwen3_vl", marks=SLOW),  # interleaved M-RoPE (deepstack only where images are)
    pytest.param("qwen3_vl_moe", marks=SLOW),  # MoE, interleaved M-RoPE
    pytest.param("glm4v_moe", marks=SLOW),  # MoE
    pytest.param("gemma3", marks=SLOW),  # text only: causal (bidirectional spans only where images are)
]


def vlm_engine(path, **options) -> Engine:
    return Engine(str(path), dtype="float32", device="cpu", kv_cache_memory_gb=0.05, **options)


@pytest.mark.parametrize("family", EXACT_FAMILIES)
def test_text_only_requests_equal_hf_generate(family, tiny_vlm):
    path = tiny_vlm(family)
    expected = hf_vlm_greedy(path, PROMPTS, N_NEW)
    params = SamplingParams(max_new_tokens=N_NEW, temperature=0.0, ignore_eos=True)
    with vlm_engine(path) as engine:  # one mixed batch of prompts of different lengths
        assert [o.token_ids for o in engine.generate(PROMPTS, params)] == expected
    with vlm_engine(path, max_num_batched_tokens=8, enable_prefix_caching=False) as engine:  # chunked prefill
        assert [o.token_ids for o in engine.generate(PROMPTS, params)] == expected


def test_attention_goes_into_the_language_model_only(tiny_vlm):
    """LLaVA's vision tower has as many layers as its language model: the probe still finds the language model's."""
    with vlm_engine(tiny_vlm("llava")) as engine:
        hf = engine.model.hf
        assert hf.config.get_text_config()._attn_implementation == ATTENTION_NAME
        assert hf.config.vision_config._attn_implementation in ("sdpa", "eager")
        assert [s.layer for s in engine.model.kv_slots] == [0, 1]  # the language model's two layers, one slot each
        assert all(not hasattr(m, "flab_kv_slots") for m in hf.model.vision_tower.modules())


def test_auto_picks_transformers_and_says_why_native_refuses(tiny_vlm):
    path = tiny_vlm("llava")
    with vlm_engine(path) as engine:
        assert engine.model_impl == "transformers"
        assert "image-text-to-text" in engine.describe()["impl_reason"]
        assert type(engine.processor).__name__ == "LlavaProcessor"
        assert engine.describe()["images"]["accepted"] is True
    with pytest.raises(UnsupportedModelError, match="image-text-to-text model; model_impl='native'"):
        vlm_engine(path, model_impl="native")


def test_processor_loads_without_its_video_part(tiny_vlm):
    """Qwen2-VL's processor has a video part, which transformers builds only with torchvision (absent here)."""
    with vlm_engine(tiny_vlm("qwen2_vl")) as engine:
        processor = engine.processor
        assert type(processor).__name__ == "Qwen2VLProcessor"
        assert hasattr(processor, "image_processor") and processor.tokenizer is engine.tokenizer


def test_processor_that_needs_torchvision_leaves_the_model_text_only(tiny_vlm):
    with vlm_engine(tiny_vlm("mistral3")) as engine:
        assert engine.processor is None
        images = engine.describe()["images"]
        assert images["accepted"] is False and "torchvision" in images["reason"].lower()


def test_bidirectional_attention_without_one_reference_is_refused_with_the_reason(tiny_vlm):
    """Gemma 3's image spans run (test_vlm_images.py); PaliGemma's text-only prompts attend both ways under sdpa and
    causally under eager in transformers: no one reference, refused."""
    with pytest.raises(UnsupportedModelError, match="PaliGemmaForConditionalGeneration .* no one reference to match"):
        vlm_engine(tiny_vlm("paligemma"))


def test_a_folder_without_processor_files_serves_text_and_refuses_images(tiny_vlm, tmp_path):
    import shutil

    from backend.core.errors import RequestError
    from tests.models.vlm_reference import random_images

    folder = shutil.copytree(tiny_vlm("llava"), tmp_path / "llava")
    for name in ("processor_config.json", "preprocessor_config.json"):
        (folder / name).unlink(missing_ok=True)
    params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
    with vlm_engine(folder) as engine:
        assert engine.processor is None
        assert len(engine.generate("Hello world", params)[0].token_ids) == 2
        with pytest.raises(RequestError, match="images: this model cannot take images here: .*no processor files"):
            engine.generate("Hello <image>", params, images=[random_images(1)])
