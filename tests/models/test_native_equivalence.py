"""Native implementations produce the tokens of the transformers fallback and of HF generate() (fp32, CPU),
also under chunked prefill and forced preemption; their prefill logits match HF's."""

import pytest
import torch

from backend import Engine, SamplingParams
from tests.helpers import PROMPTS, hf_greedy, hf_logits
from tests.models.conftest import N_NEW
from tests.models.helpers import prefill_logits

NATIVE_ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral", "qwen2_moe"]
GREEDY = SamplingParams(max_new_tokens=N_NEW, temperature=0.0, ignore_eos=True)
PROMPTS3 = PROMPTS[:3]  # 3 prompts of different lengths (the second is longer than the sliding windows)
# fp32 on CPU: native and HF run the same ops in the same order, the logits agree to float rounding
LOGITS_ATOL = 1e-4
SMALL_CACHE = dict(kv_cache_memory_gb=0.02)  # the default CPU budget zero-fills GiBs per engine


def _tokens(engine, prompts):
    return [o.token_ids for o in engine.generate(prompts, GREEDY)]


@pytest.mark.parametrize("arch", NATIVE_ARCHS)
def test_native_matches_transformers_and_hf_generate(tiny_model, hf_reference, arch):
    path = tiny_model(arch)
    expected = hf_reference(arch)[:3]
    with Engine(str(path), model_impl="native", dtype="float32", **SMALL_CACHE) as engine:
        assert engine.model_impl == "native"
        assert _tokens(engine, PROMPTS3) == expected
        engine.check_invariants()
        ids = engine.tokenizer.encode(PROMPTS[1])
        native_logits = prefill_logits(engine, ids)
    torch.testing.assert_close(native_logits, hf_logits(path, ids), atol=LOGITS_ATOL, rtol=0)
    with Engine(str(path), model_impl="transformers", dtype="float32", **SMALL_CACHE) as engine:
        assert engine.model_impl == "transformers"
        assert _tokens(engine, PROMPTS3) == expected


@pytest.mark.parametrize("arch", NATIVE_ARCHS)
def test_native_under_chunked_prefill_and_preemption(tiny_model, hf_reference, arch):
    path = tiny_model(arch)
    expected = hf_reference(arch)
    with Engine(str(path), model_impl="native", dtype="float32", max_num_batched_tokens=4, **SMALL_CACHE) as engine:
        assert _tokens(engine, PROMPTS) == expected
    with Engine(
        str(path), model_impl="native", dtype="float32", num_kv_blocks=6, block_size=8, max_model_len=48
    ) as engine:
        assert _tokens(engine, PROMPTS) == expected
        assert engine.stats().num_preemptions > 0
        assert engine.stats().kv_blocks_used == 0


LONGROPE = dict(
    rope_type="longrope",
    rope_theta=10000.0,
    short_factor=[1.0] * 4,
    long_factor=[1.5, 2.0, 3.0, 4.0],
    original_max_position_embeddings=16,
)
VARIANTS = {  # options the presets do not exercise
    # partial rotary + longrope: PROMPTS[1] (19 tokens) runs on the long factors, the others stay below 16 tokens
    "phi3-partial-longrope": (
        "phi3",
        dict(partial_rotary_factor=0.5, original_max_position_embeddings=16, rope_parameters=LONGROPE),
    ),
    "qwen2-sliding-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "llama-yarn-bias": (
        "llama",
        dict(
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128
            ),
        ),
    ),
    "qwen2_moe-dense-layer": ("qwen2_moe", dict(mlp_only_layers=[0], norm_topk_prob=True)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_native_variants_match_hf_generate(tiny_variant, variant):
    arch, overrides = VARIANTS[variant]
    path = tiny_variant(variant, arch, **overrides)
    with Engine(str(path), model_impl="native", dtype="float32", **SMALL_CACHE) as engine:
        assert _tokens(engine, PROMPTS3) == hf_greedy(path, PROMPTS3, N_NEW)


@pytest.mark.parametrize("arch", ["llama", "phi3"])  # shards merged (llama); already fused in the checkpoint (phi3)
def test_native_int8_matches_transformers_int8(tiny_model, arch):
    """Fused q/k/v and gate/up shards reach the quantized linears merged: same tokens as the fallback."""
    path = tiny_model(arch)
    outs = {}
    for impl in ("native", "transformers"):
        with Engine(str(path), model_impl=impl, dtype="float32", quantization="int8", **SMALL_CACHE) as engine:
            assert engine.model_impl == impl
            outs[impl] = _tokens(engine, PROMPTS3)
    assert outs["native"] == outs["transformers"]


@pytest.mark.parametrize("arch", NATIVE_ARCHS)
def test_native_bf16_logits_match_the_fallback(tiny_model, arch):
    """bf16 on CPU: same ops in the same order as the HF modules (here they agree bit for bit; allow 2 ulps)."""
    path = str(tiny_model(arch))
    logits = {}
    for impl in ("native", "transformers"):
        with Engine(path, model_impl=impl, dtype="bfloat16", **SMALL_CACHE) as engine:
            ids = engine.tokenizer.encode(PROMPTS[1])
            logits[impl] = prefill_logits(engine, ids)
    torch.testing.assert_close(logits["native"], logits["transformers"], atol=3e-2, rtol=0)
