"""Greedy tokens of the transformers fallback equal HF generate() on the same weights (fp32, CPU)."""

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from backend import Engine, SamplingParams
from backend.core.errors import UnsupportedModelError
from tests.helpers import PROMPTS, hf_greedy

ARCHS = [
    "llama",
    "llama3",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "phi",
    "gpt_neox",
    "gpt2",
    "opt",
    "olmo",
    "olmo2",
    "granite",
    "starcoder2",
    "gptj",
    "cohere",
    "smollm3",
    "mixtral",
    "qwen2_moe",
    "gpt_oss",
]
N = 10
GREEDY = SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_impl_matches_hf_generate(tiny_model, arch):
    path = tiny_model(arch)
    if not _supports_attention_backend(path):  # e.g. GPT-J before transformers 5.24: refused with the reason
        with pytest.raises(UnsupportedModelError, match="_supports_attention_backend = True"):
            Engine(str(path), model_impl="transformers", dtype="float32")
        return
    expected = hf_greedy(path, PROMPTS, N)
    with Engine(str(path), model_impl="transformers", dtype="float32") as engine:
        assert engine.model_impl == "transformers"
        outs = engine.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == expected
        engine.check_invariants()


def _supports_attention_backend(path) -> bool:
    """Whether the installed transformers' class for this checkpoint routes attention through the interface."""
    config = AutoConfig.from_pretrained(path)
    return bool(AutoModelForCausalLM._model_mapping[type(config)]._supports_attention_backend)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "qwen3"])
def test_equality_under_chunked_prefill_prefix_hits_and_preemption(tiny_model, arch):
    path = tiny_model(arch)
    shared = "The quick brown fox jumps over the lazy dog. A paged KV cache splits memory into blocks. "
    prompts = [shared + "Hello", shared + "1 2 3 4", shared + "Once upon a time", "Hello world!"]
    expected = hf_greedy(path, prompts, N)
    # Chunked prefill forced: at most 5 tokens per step.
    with Engine(str(path), dtype="float32", model_impl="transformers", max_num_batched_tokens=5) as engine:
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
    # Prefix cache hits: the second round finds the shared prompt blocks cached.
    with Engine(str(path), dtype="float32", model_impl="transformers", block_size=8) as engine:
        first = engine.generate(prompts, GREEDY)
        second = engine.generate(prompts, GREEDY)
        assert [o.token_ids for o in first] == expected
        assert [o.token_ids for o in second] == expected
        assert sum(o.num_cached_tokens for o in second) >= 3 * 16
        engine.check_invariants()
        assert engine.stats().kv_blocks_used == 0
    # Preemption forced: 12 blocks of 4 tokens cannot hold two 30-token sequences at once.
    with Engine(
        str(path),
        dtype="float32",
        model_impl="transformers",
        block_size=4,
        num_kv_blocks=12,
        max_model_len=48,
        enable_prefix_caching=False,
    ) as engine:
        outs = engine.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
        assert engine.stats().num_preemptions > 0
        assert engine.stats().kv_blocks_used == 0
