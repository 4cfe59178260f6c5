"""The KV cache layout read from the model by the load-time probe (backend/models/kv_layout.py)."""

from __future__ import annotations

import pytest
import torch

from backend import Engine, SamplingParams
from backend.core.errors import UnsupportedModelError
from backend.core.kv_cache import KVCacheSpec, KVSlot
from backend.models.kv_layout import kv_cache_spec
from tests.helpers import PROMPTS, hf_greedy
from tests.models.arch_sweep import build_sweep_model

SMALL = dict(model_impl="transformers", dtype="float32", kv_cache_memory_gb=0.02)
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def sweep_model(tmp_path_factory):
    built: dict = {}

    def make(model_type: str):
        if model_type not in built:
            path = tmp_path_factory.mktemp(model_type) / "m"
            build_sweep_model(model_type, path)
            built[model_type] = path
        return built[model_type]

    return make


def test_bytes_per_token_is_the_sum_over_slots():
    spec = KVCacheSpec((KVSlot(0, 2, 24, 16), KVSlot(1, 1, 16, 16)), torch.float32, 16)
    assert spec.bytes_per_token() == 4 * (2 * (24 + 16) + 1 * (16 + 16))
    assert spec.bytes_per_block == 16 * spec.bytes_per_token()
    uniform = KVCacheSpec.uniform(3, 2, 8, torch.bfloat16, 16)
    assert uniform.bytes_per_token() == 2 * 3 * 2 * 8 * 2
    assert (uniform.num_layers, uniform.num_kv_heads, uniform.head_dim) == (3, 2, 8)
    assert "slot_shapes" not in uniform.describe() and "slot_shapes" in spec.describe()


@pytest.mark.parametrize(
    "model_type,slots",
    [
        ("gpt_bigcode", [(0, 1, 16, 16), (1, 1, 16, 16)]),  # multi-query: one kv head
        ("deepseek_v3", [(0, 4, 24, 16), (1, 4, 24, 16)]),  # MLA: K = nope 16 + rope 8, V 16
        ("diffllama", [(0, 2, 16, 16), (0, 2, 16, 16), (1, 2, 16, 16), (1, 2, 16, 16)]),  # two calls per layer
    ],
)
def test_probe_records_each_call(sweep_model, model_type, slots):
    with Engine(str(sweep_model(model_type)), **SMALL) as engine:
        spec = engine.kv_cache_spec
        assert [(s.layer, s.num_kv_heads, s.k_head_dim, s.v_head_dim) for s in spec.slots] == slots
        assert (
            engine.describe()["kv_cache"]["bytes"] == engine.describe()["kv_cache"]["num_blocks"] * spec.bytes_per_block
        )
        assert engine.describe()["kv_cache"]["kv_heads"] == spec.num_kv_heads


def test_padded_slots_give_the_same_tokens(sweep_model, monkeypatch):
    """K and V stored at one head size (what the Triton kernels get) changes nothing: checked on the torch path."""
    path = sweep_model("deepseek_v3")
    expected = hf_greedy(path, PROMPTS[:2], 6)
    monkeypatch.setattr(
        "backend.core.parts.kv_spec_for",
        lambda loaded, block_size, backend: kv_cache_spec(loaded.model, loaded.dtype, block_size, pad_head_dims=True),
    )
    with Engine(str(path), **SMALL) as engine:
        assert {(s.k_head_dim, s.v_head_dim) for s in engine.kv_cache_spec.slots} == {(24, 24)}
        assert [o.token_ids for o in engine.generate(PROMPTS[:2], GREEDY)] == expected


def test_a_layer_that_bypasses_the_attention_function_is_refused(tiny_model, monkeypatch):
    """Layer 1's attention replaced by one that never calls ALL_ATTENTION_FUNCTIONS: refused, naming layer 1."""
    from backend.models import transformers as tm

    real_probe = tm.probe_kv_layout

    def bypass_then_probe(model, device):
        attn = model.hf.model.layers[1].self_attn

        def forward(hidden_states, *args, **kwargs):
            return attn.o_proj(attn.q_proj(hidden_states)), None

        attn.forward = forward
        return real_probe(model, device)

    monkeypatch.setattr(tm, "probe_kv_layout", bypass_then_probe)
    with pytest.raises(UnsupportedModelError, match=r"decoder layers \[1\].*never called the attention function"):
        Engine(str(tiny_model("llama")), **SMALL)


def test_native_layout_is_unchanged(tiny_model):
    with Engine(str(tiny_model("llama")), model_impl="native", dtype="float32", kv_cache_memory_gb=0.02) as engine:
        spec = engine.kv_cache_spec
        assert spec == KVCacheSpec.uniform(2, 2, 16, torch.float32, spec.block_size)


def test_jetmoe_head_size_is_kv_channels(tmp_path):
    """JetMoe's head size is kv_channels (8 here), not hidden_size / heads (16)."""
    path = tmp_path / "jetmoe"
    build_sweep_model("jetmoe", path, kv_channels=8)
    expected = hf_greedy(path, PROMPTS[:2], 6)
    with Engine(str(path), **SMALL) as engine:
        assert {(s.k_head_dim, s.v_head_dim) for s in engine.kv_cache_spec.slots} == {(8, 8)}
        assert [o.token_ids for o in engine.generate(PROMPTS[:2], GREEDY)] == expected


def test_bidirectional_attention_is_refused(tmp_path):
    """BERT without is_decoder attends both ways: the causal engine refuses it instead of answering differently."""
    path = tmp_path / "bert"
    build_sweep_model("bert", path, is_decoder=False)
    with pytest.raises(UnsupportedModelError, match="bidirectionally.*is_decoder=True"):
        Engine(str(path), **SMALL)
