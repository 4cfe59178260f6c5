"""Requests with images (backend/multimodal/): the processor expands the placeholders, the model's own
get_image_features runs once per request at its first prefill step, its rows replace the image tokens' embeddings,
Qwen-VL's M-RoPE positions come from its own get_rope_index. Greedy tokens equal HF generate() with the same
image+text inputs (fp32), in batches that mix image-text and text-only requests, under chunked prefill and
preemption; the KV block hashes cover the pixels; bad input is a RequestError naming the field."""

from __future__ import annotations

import pytest
import transformers

from backend import Engine, SamplingParams
from backend.core.errors import RequestError
from backend.models.transformers import TransformersModel
from backend.tools.tiny_vlms import FAMILIES
from tests.models.vlm_reference import hf_vlm_greedy, random_images


def pil_image_processors_without_torchvision() -> bool:
    try:
        transformers.SmolVLMImageProcessorPil()
    except ImportError:
        return False
    return True


N_NEW = 8
GREEDY = SamplingParams(max_new_tokens=N_NEW, temperature=0.0, ignore_eos=True)
IMAGE_FAMILIES = [
    "llava",
    "gemma3",  # each image's tokens attend to each other both ways: bidirectional spans, never split by a chunk
    "qwen2_vl",  # M-RoPE from the model's own get_rope_index
    pytest.param("qwen2_5_vl", marks=pytest.mark.slow),  # window attention in the vision tower, M-RoPE delta -6
    pytest.param("idefics3", marks=pytest.mark.slow),  # an image split into several sub-images
    pytest.param(  # Idefics3's architecture, its own processor (loaded without its video part)
        "smolvlm",
        marks=pytest.mark.skipif(
            not pil_image_processors_without_torchvision(),
            reason="this transformers' SmolVLMImageProcessorPil requires torchvision (5.17; not 5.25)",
        ),
    ),
    pytest.param("glm4v_moe", marks=pytest.mark.slow),  # MoE language model, M-RoPE over a partial rotary
    "qwen3_vl",  # deepstack: image features added to the hidden states after the language model's first layer
    pytest.param("qwen3_vl_moe", marks=pytest.mark.slow),  # deepstack, MoE
]


def vlm_engine(path, **options) -> Engine:
    options.setdefault("kv_cache_memory_gb", 0.05)
    return Engine(str(path), dtype="float32", device="cpu", **options)


def mixed_requests(family: str) -> tuple[list[str], list]:
    """Two image-text prompts of different lengths (one image inside the text, two images around it) and a
    text-only one."""
    image = FAMILIES[family].image_text
    prompts = [f"Hello {image} world! Once upon", f"{image} The quick brown fox {image}", "1 2 3 4 5 6 7"]
    a, b, c = random_images(3)
    return prompts, [[a], [b, c], None]


def count_encodes(engine: Engine) -> list[int]:
    """Wrap the model's encode_images to count the vision tower's runs (one entry per run)."""
    calls: list[int] = []
    encode = engine.model.encode_images

    def counted(inputs):
        calls.append(inputs.num_images)
        return encode(inputs)

    engine.model.encode_images = counted
    return calls


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_image_requests_equal_hf_generate_mixed_chunked_preempted(family, tiny_vlm):
    path = tiny_vlm(family)
    prompts, images = mixed_requests(family)
    expected = hf_vlm_greedy(path, prompts, N_NEW, images)
    with vlm_engine(path) as engine:  # one batch: image-text and text-only requests of different lengths
        calls = count_encodes(engine)
        outs = engine.generate(prompts, GREEDY, images=images)
        assert [o.token_ids for o in outs] == expected
        assert calls == [1, 2]  # one vision-tower run per image-text request, for all its images
    longest = max(len(o.prompt_token_ids) for o in outs) + N_NEW
    # chunks of 8 tokens split the image tokens over several steps; features computed once per request
    with vlm_engine(path, max_num_batched_tokens=8, enable_prefix_caching=False) as engine:
        calls = count_encodes(engine)
        assert [o.token_ids for o in engine.generate(prompts, GREEDY, images=images)] == expected
        assert len(calls) == 2
    # too few blocks for all three at once: preemption recomputes the KV, the features are kept (not recomputed)
    with vlm_engine(
        path,
        block_size=4,
        num_kv_blocks=-(-longest // 4) + 2,  # the longest request fits, the three together do not
        max_model_len=4 * (-(-longest // 4) + 2),
        enable_prefix_caching=False,
        kv_cache_memory_gb=None,
    ) as engine:
        calls = count_encodes(engine)
        outs = engine.generate(prompts, GREEDY, images=images)
        assert [o.token_ids for o in outs] == expected
        assert engine.stats().num_preemptions > 0
        assert len(calls) == 2
        assert engine.stats().kv_blocks_used == 0


def test_gemma3_chunks_keep_each_image_whole_and_the_spans_matter(tiny_vlm, monkeypatch):
    """Under a budget of 5 tokens, chunks that would end inside an image's 4 tokens end at its start (or take it whole);
    with the spans taken away (causal attention) the logits differ: the exactness above depends on them (with
    transformers 5.25 the greedy tokens differ too, test_vlm_bidirectional.py checks the mask itself)."""
    path = tiny_vlm("gemma3")
    prompts, images = mixed_requests("gemma3")
    expected = hf_vlm_greedy(path, prompts, N_NEW, images)
    chunks: list[tuple[tuple, int, int]] = []

    def record(batch):
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.images is not None:
                chunks.append((seq.images.bidirectional_spans, seq.num_computed_tokens, n))

    with vlm_engine(path, max_num_batched_tokens=5, enable_prefix_caching=False) as engine:
        handles = [engine.add_request(p, GREEDY, images=i) for p, i in zip(prompts, images)]
        outs: dict[int, list[int]] = {}
        while engine.num_requests:
            for delta in engine.step(on_batch=record):
                outs.setdefault(delta.request_id, []).extend(delta.token_ids)
    assert [outs[h] for h in handles] == expected
    spans = {s for spans, _, _ in chunks for s in spans}
    assert len(spans) == 3 and all(e - s == 4 for s, e in spans)  # three images of 4 tokens
    assert not [(start, n) for spans, start, n in chunks for s, e in spans if s < start + n < e]
    assert any(start == s and n == e - s for spans, start, n in chunks for s, e in spans)  # a chunk moved to a span
    # the logprobs of the first sampled token (the prompt's last position, after the images): the spans change them
    first = SamplingParams(max_new_tokens=1, temperature=0.0, logprobs=0)
    with vlm_engine(path) as engine:
        with_spans = [o.logprobs[0] for o in engine.generate(prompts[:2], first, images=images[:2])]
    monkeypatch.setattr(TransformersModel, "bidirectional_spans", lambda self, processed: ())
    with vlm_engine(path) as engine:
        causal = [o.logprobs[0] for o in engine.generate(prompts[:2], first, images=images[:2])]
    assert all(abs(a - b) > 1e-4 for a, b in zip(with_spans, causal)), (with_spans, causal)


def test_image_changes_the_output_and_the_stream_takes_images(tiny_vlm):
    """A test of image handling that could not fail if the image had no effect would be worthless."""
    path = tiny_vlm("llava")
    prompt = "Hello <image> world! Once upon"
    a, b = random_images(2)
    with vlm_engine(path) as engine:
        with_a = engine.generate(prompt, GREEDY, images=[a])[0].token_ids
        with_b = engine.generate(prompt, GREEDY, images=[b])[0].token_ids
        assert with_a != with_b
        streamed = [t for d in engine.stream(prompt, GREEDY, images=a) for t in d.token_ids]
        assert streamed == with_a
        with engine.open_stream(prompt, GREEDY, images=b) as handle:
            assert [t for d in handle for t in d.token_ids] == with_b


def test_prefix_cache_covers_the_pixels(tiny_vlm):
    path = tiny_vlm("qwen2_vl")
    prompt = "Hello <|vision_start|><|image_pad|><|vision_end|> world! The quick brown fox jumps over the lazy dog."
    a, b = random_images(2, seed=3)
    expected = hf_vlm_greedy(path, [prompt, prompt], N_NEW, [[a], [b]])
    assert expected[0] != expected[1]
    with vlm_engine(path, block_size=4) as engine:
        first = engine.generate(prompt, GREEDY, images=[a])[0]
        other = engine.generate(prompt, GREEDY, images=[b])[0]  # same token ids, another image
        calls = count_encodes(engine)
        again = engine.generate(prompt, GREEDY, images=[a])[0]
        assert calls == []  # its image tokens all came from the prefix cache: no vision-tower run
        text = engine.generate(prompt_token_ids=[first.prompt_token_ids], sampling_params=GREEDY)[0]
    assert first.prompt_token_ids == other.prompt_token_ids
    assert [first.token_ids, other.token_ids] == expected
    assert other.num_cached_tokens == 0 and text.num_cached_tokens == 0  # no block shared across images
    assert again.num_cached_tokens >= 4 and again.token_ids == first.token_ids  # same image and prompt: a hit


def test_bad_image_input_is_a_request_error_and_the_engine_keeps_serving(tiny_vlm, tiny_model, tmp_path):
    path = tiny_vlm("llava")
    prompt = "Hello <image> world!"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with vlm_engine(path, max_model_len=24) as engine:
        with pytest.raises(RequestError, match=r"images\[0\]: cannot decode the image"):
            engine.generate(prompt, GREEDY, images=[[b"\x89PNG\r\n\x1a\n not really a png"]])
        with pytest.raises(RequestError, match=r"images\[0\]: cannot decode the image"):
            engine.generate(prompt, GREEDY, images=[[str(tmp_path / "broken.png")]])
        with pytest.raises(RequestError, match=r"images\[0\]: no image file"):
            engine.generate(prompt, GREEDY, images=[[str(tmp_path / "missing.png")]])
        with pytest.raises(RequestError, match=r"images\[0\] must be a PIL image, a file path"):
            engine.generate(prompt, GREEDY, images=[[42]])
        with pytest.raises(RequestError, match="at most 16 per request"):
            engine.generate(prompt, GREEDY, images=[random_images(17)])
        with pytest.raises(RequestError, match="one image placeholder"):
            engine.generate(prompt, GREEDY, images=[random_images(2)])  # two images, one placeholder
        with pytest.raises(RequestError, match="the context holds 24"):
            engine.generate(prompt + " 1 2 3 4 5 6 7 8 9", GREEDY, images=[random_images(1)])
        with pytest.raises(RequestError, match="one entry per prompt"):
            engine.generate([prompt, prompt], GREEDY, images=[random_images(1)])
        with pytest.raises(RequestError, match="not with prompt_token_ids"):
            engine.add_request(prompt_token_ids=[1, 2], images=random_images(1))
        assert engine.num_requests == 0
        short = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
        assert len(engine.generate(prompt, short, images=[random_images(1)])[0].token_ids) == 2
    with Engine(str(tiny_model("llama")), dtype="float32", kv_cache_memory_gb=0.05) as engine:
        with pytest.raises(RequestError, match="images: this model takes no images"):
            engine.generate("Hello", GREEDY, images=[random_images(1)])


def test_qwen3_vl_deepstack_rows_matter(tiny_vlm, monkeypatch):
    """Without the deepstack rows (only the merged features) the tokens differ from HF: the exactness above depends
    on the language model's own deepstack addition, not just on the merged image features."""
    path = tiny_vlm("qwen3_vl")
    prompts, images = mixed_requests("qwen3_vl")
    expected = hf_vlm_greedy(path, prompts, N_NEW, images)
    encode = TransformersModel.encode_images
    monkeypatch.setattr(TransformersModel, "encode_images", lambda self, inputs: encode(self, inputs)[:, 0])
    with vlm_engine(path) as engine:
        assert [o.token_ids for o in engine.generate(prompts, GREEDY, images=images)] != expected


@pytest.mark.slow
def test_models_whose_images_cannot_run_refuse_image_requests_with_the_reason(tiny_vlm):
    with vlm_engine(tiny_vlm("mistral3")) as engine:
        with pytest.raises(RequestError, match="images: this model cannot take images here: .*[Tt]orchvision"):
            engine.generate("Hello [IMG] world", GREEDY, images=[random_images(1)])


def test_gemma3_prefix_cache_hits_inside_an_image_span_stay_exact(tiny_vlm):
    """The same image and prompt again: its cached blocks may end inside an image's span (their KV was computed with
    the whole span, which the image hash salts); the rest of the span is computed whole in one step."""
    path = tiny_vlm("gemma3")
    prompt = "Hello <start_of_image>"  # ends 2 tokens after its image: a hit of whole blocks can end inside the image
    (image,) = random_images(1, seed=5)
    (expected,) = hf_vlm_greedy(path, [prompt], N_NEW, [[image]])
    inside = []
    for block_size in (2, 4, 8):
        with vlm_engine(path, block_size=block_size) as engine:
            first = engine.generate(prompt, GREEDY, images=[image])[0]
            again = engine.generate(prompt, GREEDY, images=[image])[0]
        assert first.token_ids == again.token_ids == expected
        assert again.num_cached_tokens > 0
        spans = tiny_spans(engine_prompt_ids=first.prompt_token_ids, path=path)
        inside += [s < again.num_cached_tokens < e for s, e in spans]
    assert any(inside)  # at least one hit ended inside the span


def tiny_spans(engine_prompt_ids: list[int], path) -> list[tuple[int, int]]:
    """The image-token runs of a Gemma 3 prompt (token_type_ids == 1 where the image token stands)."""
    from transformers import AutoConfig

    image_token = AutoConfig.from_pretrained(path).image_token_id
    runs, start = [], None
    for i, t in enumerate([*engine_prompt_ids, -1]):
        if t == image_token and start is None:
            start = i
        elif t != image_token and start is not None:
            runs.append((start, i))
            start = None
    return runs
