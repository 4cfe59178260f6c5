"""Chat messages with image parts on the Python API (`Engine.chat_prompt` / `Engine.chat`, backend/multimodal/chat.py):
the processor's chat template, greedy tokens equal to HF generate() on the processor's own apply_chat_template
inputs (fp32); every kind of image source gives the same request; bad input is an EngineError naming the field, and
the engine serves on."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from backend import Engine, SamplingParams
from backend.core.errors import ContextLengthError, RequestError
from backend.loading.processor import load_processor
from backend.multimodal.chat import NoImagesError
from tests.models.vlm_reference import random_images

N_NEW = 8
GREEDY = SamplingParams(max_new_tokens=N_NEW, temperature=0.0, ignore_eos=True)


def vlm_engine(path, **options) -> Engine:
    options.setdefault("kv_cache_memory_gb", 0.05)
    return Engine(str(path), dtype="float32", device="cpu", **options)


def messages(*images, text: str = "What is in the picture?") -> list[dict]:
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def hf_chat_greedy(path, msgs: list[dict]) -> tuple[list[int], list[int]]:
    """HF's own path: processor.apply_chat_template(tokenize=True) then generate(); (prompt ids, new tokens)."""
    processor = load_processor(path, AutoConfig.from_pretrained(path), False).processor
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    inputs = processor.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    gen = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    prompt = inputs["input_ids"][0].tolist()
    return prompt, gen[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", ["llava", pytest.param("qwen2_vl", marks=pytest.mark.slow)])
def test_chat_with_images_equals_hf_apply_chat_template_and_generate(family, tiny_vlm):
    path = tiny_vlm(family)
    a, b = random_images(2, seed=3)
    msgs = messages(a, b)
    prompt, expected = hf_chat_greedy(path, msgs)
    with vlm_engine(path) as engine:
        out = engine.chat(msgs, GREEDY)
        assert out.prompt_token_ids == prompt and out.token_ids == expected
        p = engine.chat_prompt(msgs)
        assert len(p.images) == 2 and p.token_ids is None
        stream = list(engine.stream(**p.request_kwargs(), params=GREEDY))
        assert stream[-1].output.token_ids == expected


def test_image_sources_give_the_same_request(tiny_vlm, tmp_path):
    path = tiny_vlm("llava")
    image = random_images(1, seed=4)[0]
    data = png(image)
    file = tmp_path / "a.png"
    file.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    with vlm_engine(path) as engine:
        outs = [engine.chat(messages(src), GREEDY) for src in (image, str(file), data)]
        openai_style = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        pil_style = [{"role": "user", "content": [{"type": "image", "image": image}]}]
        assert engine.chat(openai_style, GREEDY).token_ids == engine.chat(pil_style, GREEDY).token_ids
    assert len({tuple(o.token_ids) for o in outs}) == 1
    assert len({tuple(o.prompt_token_ids) for o in outs}) == 1


def test_text_only_chat_on_a_vlm(tiny_vlm):
    with vlm_engine(tiny_vlm("llava")) as engine:
        p = engine.chat_prompt([{"role": "user", "content": "hello"}])
        assert not p.images and p.token_ids == engine.tokenizer(p.text, add_special_tokens=False)["input_ids"]
        assert len(engine.chat([{"role": "user", "content": "hello"}], GREEDY).token_ids) == N_NEW


def bad_inputs(engine: Engine, tmp_path) -> None:
    """Each bad chat request: its error and param; a normal request after each."""
    good = random_images(1)[0]
    corrupt = png(good)[:40]
    cases = [
        (messages(corrupt), RequestError, "messages[1].content[0].image", "cannot decode"),
        (messages(b"not an image"), RequestError, "messages[1].content[0].image", "cannot decode"),
        (messages(str(tmp_path / "missing.png")), RequestError, "messages[1].content[0].image", "no image file"),
        (messages("https://example.com/a.png"), RequestError, "messages[1].content[0].image", "remote URL"),
        (messages(*[good] * 17), RequestError, "images", "at most 16"),
        (messages(good, text="x" * 3000), ContextLengthError, "prompt", "context holds"),
        ([{"role": "wizard", "content": "x"}], RequestError, "messages[0].role", "one of"),
        ([{"role": "user", "content": [{"type": "audio"}]}], RequestError, "messages[0].content[0].type", "audio"),
        ([], RequestError, "messages", "non-empty"),
    ]
    for msgs, error, param, words in cases:
        with pytest.raises(error, match=words) as info:
            engine.chat(msgs, GREEDY)
        assert info.value.param == param, (param, info.value)
        assert len(engine.chat(messages(good), GREEDY).token_ids) == N_NEW  # the engine serves on


def test_bad_chat_input_is_a_clear_error_and_the_engine_serves_on(tiny_vlm, tmp_path):
    with vlm_engine(tiny_vlm("llava"), max_model_len=512) as engine:
        bad_inputs(engine, tmp_path)
        engine.start_background_loop()  # the same through the background loop
        bad_inputs(engine, tmp_path)


def test_an_image_for_a_language_model_is_refused(tiny_model):
    with Engine(str(tiny_model("llama")), dtype="float32", num_kv_blocks=64) as engine:
        engine.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        with pytest.raises(NoImagesError, match="takes no images") as info:
            engine.chat(messages(random_images(1)[0]))
        assert info.value.param == "messages[1].content[0].image"
        out = engine.chat([{"role": "user", "content": "hello"}], SamplingParams(max_new_tokens=3))
        assert len(out.token_ids) == 3
