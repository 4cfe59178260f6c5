"""The implementation switch (auto | native | transformers), the native loader's errors, describe_model."""

import importlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from backend import Engine
from backend.core.errors import UnsupportedModelError
from backend.models import NATIVE_MODELS, build_model, select_model_impl
from backend.models.describe import NATIVE_ATTENTION, describe_model


def test_registry_entries_import_and_follow_the_contract():
    for arch, target in NATIVE_MODELS.items():
        module_name, cls_name = target.split(":")
        cls = getattr(importlib.import_module(module_name), cls_name)
        assert cls.impl == "native", arch
        assert callable(getattr(cls, "load_checkpoint")), arch


@pytest.mark.parametrize(
    "arch,impl",
    [
        ("llama", "native"),
        ("gemma2", "native"),
        ("qwen2_moe", "native"),
        ("gpt2", "transformers"),
        ("gpt_neox", "transformers"),
    ],
)
def test_auto_picks_native_for_registered_architectures(tiny_model, arch, impl):
    config = AutoConfig.from_pretrained(tiny_model(arch))
    assert select_model_impl(config, "auto") == impl
    assert select_model_impl(config, "transformers") == "transformers"


def test_auto_engine_runs_native(tiny_model):
    with Engine(str(tiny_model("llama")), dtype="float32", kv_cache_memory_gb=0.02) as engine:
        assert engine.model_impl == "native"
        assert describe_model(engine.model)["attention"] == NATIVE_ATTENTION


def test_native_on_unregistered_architecture_lists_the_supported_ones(tiny_model):
    with pytest.raises(UnsupportedModelError) as err:
        Engine(str(tiny_model("gpt2")), model_impl="native", dtype="float32", kv_cache_memory_gb=0.02)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message and "LlamaForCausalLM" in message and "Gemma2ForCausalLM" in message


def _native_meta(path):
    config = AutoConfig.from_pretrained(path)
    return build_model(config, "native", torch.float32, False)


def test_loaded_native_model_has_nothing_on_meta(tiny_model):
    model = _native_meta(tiny_model("qwen2_moe"))
    assert all(p.is_meta for p in model.parameters())
    model.load_checkpoint(tiny_model("qwen2_moe"), torch.device("cpu"), torch.float32)
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert model.lm_head.weight.dtype == torch.float32


def test_tied_embeddings_share_one_tensor(tiny_model):
    model = _native_meta(tiny_model("gemma"))
    model.load_checkpoint(tiny_model("gemma"), torch.device("cpu"), torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize(
    "drop,named", [("model.layers.1.self_attn.k_proj.weight", "qkv_proj"), ("model.norm.weight", "model.norm.weight")]
)
def test_missing_checkpoint_tensors_are_named(tiny_model, tmp_path, drop, named):
    src = tiny_model("llama")
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tensors = load_file(src / "model.safetensors")
    del tensors[drop]
    save_file(tensors, tmp_path / "model.safetensors")
    model = _native_meta(tmp_path)
    with pytest.raises(UnsupportedModelError, match=named):
        model.load_checkpoint(tmp_path, torch.device("cpu"), torch.float32)


def test_describe_native_and_transformers(tiny_model):
    path = str(tiny_model("gemma2"))
    with Engine(path, model_impl="native", dtype="float32", quantization="int8", kv_cache_memory_gb=0.02) as engine:
        native = describe_model(engine.model)
    with Engine(path, model_impl="transformers", dtype="float32", kv_cache_memory_gb=0.02) as engine:
        fallback = describe_model(engine.model)
    assert native["implementation"] == "native" and native["attention"] == NATIVE_ATTENTION
    assert native["swapped"] == {"quantized linear Int8Linear": 8}  # qkv, o, gate_up, down per layer (lm_head kept)
    assert native["sliding_window"] == [8] and native["final_softcap"] == 3.0
    assert fallback["implementation"] == "transformers" and fallback["attention"] == "fallback_lab_paged"
    assert fallback["injected"] == {"attention function 'fallback_lab_paged'": {"Gemma2Attention": 2}}
    for info in (native, fallback):
        assert (info["layers"], info["heads"], info["kv_heads"], info["head_dim"]) == (2, 4, 2, 16)
    assert native["parameters"] == fallback["parameters"]
