"""The memory estimate shows what the engine will get: the same quantization parser, the same KV bytes per token
and the same KV sizing (context, blocks, cache bytes) as a loaded Engine with those settings."""

from __future__ import annotations

import pytest
import torch

from backend import Engine
from backend.core.errors import KVCacheError, QuantizationError
from backend.loading.memory import EngineKVSettings, estimate_memory

SETTINGS = [
    dict(kv_cache_memory_gb=4 / 1024),  # the app's 4 MiB: the context is what the budget holds
    dict(kv_cache_memory_gb=4 / 1024, block_size=32, max_model_len=128),
    dict(num_kv_blocks=40, block_size=8),
]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("dtype, quantization", [("float32", None), ("bfloat16", "int4:g64,kernel=torch")])
def test_estimate_equals_the_loaded_engine(settings, dtype, quantization):
    engine_kv = EngineKVSettings(device="cpu", **settings)
    est = estimate_memory("tiny:llama", dtype=dtype, quantization=quantization, engine=engine_kv)
    with Engine("tiny:llama", dtype=dtype, quantization=quantization, device="cpu", **settings) as engine:
        info = engine.describe()
        assert est.context_len == engine.max_model_len
        assert est.kv_blocks == info["kv_cache"]["num_blocks"] == engine.stats().kv_blocks_total
        assert est.kv_cache_bytes == info["kv_cache"]["bytes"]
        assert est.block_size == info["kv_cache"]["block_size"]
        assert est.quantization == (engine.describe()["quantization"] if quantization else None)
    assert any("the engine will hold" in n for n in est.notes)


def test_estimate_parses_what_the_engine_parses():
    """The estimate takes the engine's quantization strings (options and all) and refuses what it refuses."""
    plain = estimate_memory("tiny:qwen3", dtype="float32", quantization="int4")
    g32 = estimate_memory("tiny:qwen3", dtype="float32", quantization="int4:group_size=32,kernel=torch")
    assert g32.weight_bytes > plain.weight_bytes  # smaller groups: more scales
    with pytest.raises(QuantizationError, match="group size"):
        estimate_memory("tiny:qwen3", quantization="int4:g48")
    with pytest.raises(QuantizationError):
        estimate_memory("tiny:qwen3", quantization="gptq")  # a checkpoint format on a full-precision checkpoint
    with pytest.raises(QuantizationError):
        Engine("tiny:qwen3", quantization="gptq")


@pytest.mark.parametrize("tied", [False, True])
def test_estimate_counts_a_quantized_lm_head(tmp_path, tied):
    """`lm_head=int8`: the output head counted in int8 (untied: instead of its bf16 weight; tied: a quantized copy
    beside the embedding, which stays), as the loaded engine holds it."""
    from backend.loading.tiny_models import build_tiny_model

    path = str(build_tiny_model("llama", tmp_path / "m", dtype=torch.bfloat16, tie_word_embeddings=tied))
    plain = estimate_memory(path, dtype="bfloat16", quantization="int4:g32,kernel=torch")
    head = estimate_memory(path, dtype="bfloat16", quantization="int4:g32,kernel=torch,lm_head=int8")
    with Engine(path, dtype="bfloat16", device="cpu", cpu_kernels="torch", num_kv_blocks=16) as e:
        vocab, hidden = e.model.lm_head.out_features, e.model.lm_head.in_features
    int8_head = vocab * hidden + vocab * 2  # codes + one bf16 scale per row
    expected = plain.weight_bytes + int8_head - (0 if tied else vocab * hidden * 2)
    assert head.weight_bytes == expected
    options = dict(dtype="bfloat16", device="cpu", cpu_kernels="torch", cpu_linear="none", num_kv_blocks=16)
    with Engine(path, quantization="int4:g32,kernel=torch,lm_head=int8", **options) as e:
        with Engine(path, quantization="int4:g32,kernel=torch", **options) as p:  # no packed copies on either side
            assert e.weights_bytes - p.weights_bytes == head.weight_bytes - plain.weight_bytes


def test_estimate_refuses_settings_the_engine_refuses():
    with pytest.raises(KVCacheError, match="exceeds the model's context"):
        estimate_memory("tiny:llama", engine=EngineKVSettings(device="cpu", max_model_len=10**6))
    with pytest.raises(KVCacheError, match="holds no block"):
        estimate_memory("tiny:llama", engine=EngineKVSettings(device="cpu", kv_cache_memory_gb=1e-9))
