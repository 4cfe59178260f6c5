"""Built-in model names (backend/loading/builtin.py) and the one cache folder (backend/paths.py): every name
resolves through the engine's own resolution (Engine, benchmarks), builds once, and the real default model
answers a chat prompt exactly as HF generate() does on the same converted weights."""

from __future__ import annotations

import pytest
import torch

from backend import Engine, SamplingParams, paths
from backend.core.errors import ModelNotFoundError
from backend.loading import builtin
from backend.loading.hub import resolve_model
from backend.tools import bench

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 24


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "flab"))
    assert paths.cache_dir() == tmp_path / "flab"
    assert builtin.builtin_path("tiny:llama") == tmp_path / "flab" / "models" / "tiny-llama"
    from backend.tools.train_tiny import default_dir

    assert default_dir() == tmp_path / "flab" / "models" / "tiny-trained"
    monkeypatch.delenv(paths.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / paths.CACHE_NAME


def test_registry_names():
    names = builtin.builtin_names()
    assert names[0] == builtin.SMOLLM2_INSTRUCT and builtin.TRAINED in names
    assert {"tiny:llama", "tiny:smollm2-135m", "tiny:qwen3"} <= set(names)
    assert len(names) == len(set(names)) and len({m.folder for m in builtin.builtin_models()}) == len(names)
    assert builtin.find_builtin(" tiny:llama ").folder == "tiny-llama"
    assert builtin.find_builtin("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a Hub id stays a Hub id
    assert builtin.find_builtin(builtin.SMOLLM2_INSTRUCT).hub_id == builtin.SMOLLM2_HUB_ID
    with pytest.raises(ModelNotFoundError, match="no built-in model 'tiny:nope'.*tiny:llama"):
        builtin.find_builtin("tiny:nope")
    with pytest.raises(ModelNotFoundError, match="no built-in model"):
        Engine("tiny:nope")


def test_build_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path))
    events = []
    first = builtin.resolve_builtin("tiny:qwen3", events.append)
    assert first == tmp_path / "models" / "tiny-qwen3" and (first / builtin.BUILD_INFO).is_file()
    assert [e.stage for e in events] == ["build", "done"]
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert builtin.resolve_builtin("tiny:qwen3") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not built again
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".tiny-qwen3.building")]


def test_names_resolve_in_engine_and_bench(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path))
    folder = tmp_path / "models" / "tiny-llama"
    assert resolve_model("tiny:llama") == folder
    assert bench.resolve_path("tiny:llama", "float32") == str(folder)
    with Engine("tiny:llama", dtype="float32", num_kv_blocks=16) as engine:
        out = engine.generate(["Hello"], SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert len(out[0].token_ids) == 4
        assert engine.describe()["model"] == "tiny:llama"


def test_default_model_offline_is_the_converted_gguf(smollm2_instruct):
    """Offline (the tests' HF_HUB_OFFLINE=1) the real model's name is the folder converted from the GGUF."""
    assert resolve_model(builtin.SMOLLM2_INSTRUCT, offline=True) == smollm2_instruct
    assert bench.resolve_path(builtin.SMOLLM2_INSTRUCT) == str(smollm2_instruct)


def _hf_chat_greedy(path) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    return gen[0, ids.shape[1] :].tolist()


def test_default_model_answers_like_hf_generate(smollm2_instruct):
    """Greedy fp32: both implementations give HF generate()'s tokens for the chat prompt (EOS included)."""
    expected = _hf_chat_greedy(smollm2_instruct)
    for impl in ("native", "transformers"):
        with Engine(builtin.SMOLLM2_INSTRUCT, model_impl=impl, dtype="float32", kv_cache_memory_gb=0.05) as engine:
            assert engine.model_impl == impl
            prompt = engine.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
            out = engine.generate([prompt], SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0))[0]
            assert out.token_ids == expected[: len(out.token_ids)], impl
            assert out.finish_reason == "stop" and len(out.token_ids) < NEW_TOKENS  # ended at EOS
            assert out.text.strip() == "The capital of France is Paris.", impl
