"""Load-time errors name the file and what to do: corrupt or missing files, a folder without a tokenizer
(and skip_tokenizer_init=True to run on token ids), missing weights on every path, and a checkpoint that needs
transformers' weight-name conversions (exaone-style: model_type "exaone", architectures ["LlamaForCausalLM"])."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from backend import Engine, SamplingParams
from backend.core.errors import ModelNotFoundError, UnsupportedModelError
from backend.loading.tiny_models import build_tokenizer
from tests.helpers import PROMPTS, hf_greedy

SMALL = dict(dtype="float32", kv_cache_memory_gb=0.02)
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)


def copy_of(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def exaone_path(tmp_path_factory):
    """A checkpoint as transformers 5.24 writes an exaone model: LlamaForCausalLM with EXAONE's weight names."""
    path = tmp_path_factory.mktemp("exaone")
    tok = build_tokenizer()
    config = AutoConfig.for_model(
        "exaone",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_exaone_style_checkpoint_is_what_the_issue_describes(exaone_path):
    config = json.loads((exaone_path / "config.json").read_text())
    assert config["model_type"] == "exaone" and config["architectures"] == ["LlamaForCausalLM"]
    assert any(k.startswith("transformer.h.0.attn.attention.") for k in load_file(exaone_path / "model.safetensors"))


def test_exaone_auto_picks_transformers_and_says_why(exaone_path, caplog):
    expected = hf_greedy(exaone_path, PROMPTS[:2], 6)
    with caplog.at_level(logging.INFO, logger="backend.models"):
        with Engine(str(exaone_path), model_impl="auto", **SMALL) as engine:
            assert engine.model_impl == "transformers"
            assert "exaone" in engine.describe()["impl_reason"]
            assert [o.token_ids for o in engine.generate(PROMPTS[:2], GREEDY)] == expected
    assert any("transformers fallback" in r.getMessage() and "exaone" in r.getMessage() for r in caplog.records)
    with Engine(str(exaone_path), model_impl="transformers", **SMALL) as engine:
        assert [o.token_ids for o in engine.generate(PROMPTS[:2], GREEDY)] == expected


def test_exaone_native_is_refused_clearly(exaone_path):
    with pytest.raises(UnsupportedModelError, match="model_type 'exaone'.*model_impl='transformers'"):
        Engine(str(exaone_path), model_impl="native", **SMALL)


def _drop_tensor(src, dst, name_part):
    copy_of(src, dst)
    tensors = load_file(src / "model.safetensors")
    dropped = next(k for k in tensors if name_part in k)
    del tensors[dropped]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dropped


@pytest.mark.parametrize("impl", ["auto", "transformers"])
def test_converted_checkpoint_missing_a_weight_is_refused(exaone_path, tmp_path, impl):
    _drop_tensor(exaone_path, tmp_path / "m", "h.1.mlp.c_fc_0")
    with pytest.raises(UnsupportedModelError, match=r"layers\.1\.mlp\.gate_proj.*download it again"):
        Engine(str(tmp_path / "m"), model_impl=impl, **SMALL)


@pytest.mark.parametrize("arch,impl", [("gpt2", "transformers"), ("llama", "transformers"), ("llama", "native")])
def test_missing_weight_is_refused_on_every_path(tiny_model, tmp_path, arch, impl):
    dropped = _drop_tensor(tiny_model(arch), tmp_path / "m", "1.mlp")
    with pytest.raises(UnsupportedModelError, match="not found|missing"):
        Engine(str(tmp_path / "m"), model_impl=impl, **SMALL)
    assert dropped  # the message names it (native: its fused parameter), checked per path below


def test_missing_weight_message_names_the_tensor(tiny_model, tmp_path):
    _drop_tensor(tiny_model("gpt2"), tmp_path / "m", "h.1.mlp.c_fc.weight")
    with pytest.raises(UnsupportedModelError, match=r"h\.1\.mlp\.c_fc\.weight"):
        Engine(str(tmp_path / "m"), model_impl="transformers", **SMALL)


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "zero-byte": lambda data: b"",
    "garbage": lambda data: b"this is not a safetensors file " * 40,
}


@pytest.mark.parametrize("impl", ["native", "transformers"])
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_safetensors_names_the_file(tiny_model, tmp_path, kind, impl):
    path = copy_of(tiny_model("llama"), tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(CORRUPTIONS[kind](weights.read_bytes()))
    with pytest.raises(UnsupportedModelError) as err:
        Engine(str(path), model_impl=impl, **SMALL)
    assert "model.safetensors" in str(err.value) and "download it again" in str(err.value)


@pytest.mark.parametrize(
    "file,content",
    [
        ("config.json", "{ this is not json"),
        ("config.json", "[1, 2, 3]"),
        ("model.safetensors.index.json", "{ garbage"),
        ("model.safetensors.index.json", '{"metadata": {}}'),
        ("tokenizer.json", '{"version": "1.0", "truncated'),
    ],
)
def test_garbage_json_files_name_the_file(tiny_model, tmp_path, file, content):
    path = copy_of(tiny_model("llama"), tmp_path / "m")
    (path / file).write_text(content)
    with pytest.raises(UnsupportedModelError) as err:
        Engine(str(path), **SMALL)
    assert file in str(err.value) and "download it again" in str(err.value)


def test_index_naming_an_absent_shard_is_refused(tiny_model, tmp_path):
    path = copy_of(tiny_model("llama"), tmp_path / "m")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    with pytest.raises(ModelNotFoundError, match="model-00002.safetensors.*download"):
        Engine(str(path), **SMALL)


def _without_tokenizer(src, dst):
    copy_of(src, dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (dst / name).unlink(missing_ok=True)
    return dst


def test_folder_without_tokenizer_points_at_skip_tokenizer_init(tiny_model, tmp_path):
    path = _without_tokenizer(tiny_model("llama"), tmp_path / "m")
    with pytest.raises(UnsupportedModelError, match="no tokenizer files.*skip_tokenizer_init=True"):
        Engine(str(path), **SMALL)


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_skip_tokenizer_init_runs_on_token_ids(tiny_model, tmp_path, impl):
    src = tiny_model("llama")
    ids = [[5, 6, 7, 8, 9], [40, 41, 42]]
    with Engine(str(src), model_impl=impl, **SMALL) as engine:
        expected = [o.token_ids for o in engine.generate(prompt_token_ids=ids, sampling_params=GREEDY)]
    path = _without_tokenizer(src, tmp_path / "m")
    with Engine(str(path), model_impl=impl, skip_tokenizer_init=True, **SMALL) as engine:
        assert engine.tokenizer is None
        assert [o.token_ids for o in engine.generate(prompt_token_ids=ids, sampling_params=GREEDY)] == expected
