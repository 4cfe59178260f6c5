"""GGUF as an import path (backend/loading/gguf.py): the conversion writes an ordinary safetensors checkpoint,
refuses corrupt or truncated files with a clear error, and the engine's own GGUF refusal names the command."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from backend import Engine
from backend.core.errors import EngineError, UnsupportedModelError
from backend.loading.builtin import smollm2_gguf_path
from backend.loading.gguf import CONVERSION_INFO, convert_gguf, inspect_gguf
from backend.tools import convert_gguf as command

COMMAND = "python -m backend.tools.convert_gguf"


def _prefix(tmp_path, nbytes: int):
    out = tmp_path / f"first-{nbytes}.gguf"
    with smollm2_gguf_path().open("rb") as src:
        out.write_bytes(src.read(nbytes))
    return out


def test_inspect_reads_the_packaged_file():
    info = inspect_gguf(smollm2_gguf_path())
    assert info.architecture == "llama" and info.num_tensors == 272


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "plain.gguf", "not a GGUF file"),  # text, no magic
        (lambda d: d / "garbage.gguf", "corrupt or truncated"),  # the magic, then noise
    ],
)
def test_corrupt_files_are_refused(tmp_path, make, match):
    (tmp_path / "plain.gguf").write_text("this is not a model\n")
    (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(UnsupportedModelError, match=match):
        convert_gguf(make(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("nbytes", [100_000, 50_000_000])  # cut in the header / metadata, cut in the tensor data
def test_truncated_files_are_refused(tmp_path, nbytes):
    with pytest.raises(UnsupportedModelError, match="corrupt or truncated|truncated"):
        convert_gguf(_prefix(tmp_path, nbytes), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.converting-*"))


def test_command_reports_the_error_and_fails(tmp_path, capsys):
    assert command.main([str(_prefix(tmp_path, 50_000_000)), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "truncated" in err and "Traceback" not in err


def test_missing_file_bad_dtype_and_occupied_folder(tmp_path):
    with pytest.raises(EngineError, match="no GGUF file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(EngineError, match="dtype must be one of"):
        convert_gguf(smollm2_gguf_path(), tmp_path / "out", dtype="int3")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(EngineError, match="not an empty folder"):
        convert_gguf(smollm2_gguf_path(), tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_converted_folder_is_an_ordinary_checkpoint(smollm2_instruct):
    config = json.loads((smollm2_instruct / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["dtype"] == "bfloat16" and config["model_type"] == "llama"
    info = json.loads((smollm2_instruct / CONVERSION_INFO).read_text())
    assert info["source"] == smollm2_gguf_path().name and info["dtype"] == "bfloat16"
    weights = load_file(smollm2_instruct / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_instruct)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text


def test_engine_refuses_gguf_and_names_the_command(tmp_path):
    folder = tmp_path / "gguf-only"
    folder.mkdir()
    shutil.copy(_prefix(tmp_path, 1000), folder / "model.Q4_1.gguf")
    with pytest.raises(UnsupportedModelError, match=COMMAND):
        Engine(str(folder))
    with pytest.raises(UnsupportedModelError, match=COMMAND):
        Engine(str(folder / "model.Q4_1.gguf"))


@pytest.mark.slow
def test_dtype_is_the_one_asked_for(tmp_path, smollm2_instruct):
    """Converted in float32, the weights are the dequantized values; the bf16 built-in is them rounded to bf16."""
    out = command.main([str(smollm2_gguf_path()), str(tmp_path / "fp32"), "--dtype", "float32"])
    assert out == 0
    fp32 = load_file(tmp_path / "fp32" / "model.safetensors")
    bf16 = load_file(smollm2_instruct / "model.safetensors")
    assert fp32.keys() == bf16.keys()
    for name, t in fp32.items():
        assert t.dtype == torch.float32
        assert torch.equal(t.to(torch.bfloat16), bf16[name]), name
