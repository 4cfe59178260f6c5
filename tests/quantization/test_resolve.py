"""resolve_quantization, apply_quantization and check_device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from backend.core.errors import QuantizationError, UnsupportedModelError
from backend.quantization import QUANTIZATION_METHODS, apply_quantization, resolve_quantization
from backend.quantization.awq import AWQMethod
from backend.quantization.base import QuantLinearBase, module_matches
from backend.quantization.compressed_tensors import CompressedTensorsMethod
from backend.quantization.fp8 import Fp8Method
from backend.quantization.fp8_checkpoint import Fp8CheckpointMethod
from backend.quantization.gptq import GPTQMethod
from backend.quantization.int4 import Int4Method, effective_group_size
from backend.quantization.int8 import Int8Method

GPTQ = {
    "quant_method": "gptq",
    "bits": 4,
    "group_size": 128,
    "desc_act": True,
    "sym": False,
    "checkpoint_format": "gptq_v2",
    "modules_to_not_convert": ["mlp.gate"],
}


def test_registry_resolves_each_method_to_its_class():
    assert set(QUANTIZATION_METHODS) == {"int8", "int4", "fp8", "gptq", "awq", "fp8_checkpoint", "compressed-tensors"}
    plain = SimpleNamespace(quantization_config=None)
    for name in ("int8", "int4", "fp8"):  # on the fly: resolved by name on a full-precision checkpoint
        assert type(resolve_quantization(name, plain)) is QUANTIZATION_METHODS[name]
    checkpoints = {  # checkpoint formats: detected from quantization_config
        "gptq": GPTQ,
        "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
        "fp8_checkpoint": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    }
    for name, qcfg in checkpoints.items():
        method = resolve_quantization(None, SimpleNamespace(quantization_config=qcfg))
        assert type(method) is QUANTIZATION_METHODS[name]
        assert not QUANTIZATION_METHODS[name].on_the_fly
        with pytest.raises(QuantizationError, match="checkpoint format"):
            resolve_quantization(name if name != "fp8_checkpoint" else "fp8_checkpoint", plain)


def test_none_on_full_precision():
    assert resolve_quantization(None, SimpleNamespace()) is None
    assert resolve_quantization(None, {}) is None
    assert resolve_quantization("none", SimpleNamespace(quantization_config=None)) is None


def test_auto_detect_from_config_dict_and_object():
    method = resolve_quantization(None, SimpleNamespace(quantization_config=GPTQ))
    assert isinstance(method, GPTQMethod)
    assert (
        method.config.bits,
        method.config.group_size,
        method.config.desc_act,
        method.config.sym,
        method.config.checkpoint_format,
    ) == (4, 128, True, False, "gptq_v2")
    assert method.skip("model.layers.0.mlp.gate") and method.skip("lm_head")
    assert not method.skip("model.layers.0.mlp.gate_proj")

    class ConfigObject:  # transformers' QuantizationConfigMixin has to_dict()
        def to_dict(self):
            return {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}

    method = resolve_quantization(None, SimpleNamespace(quantization_config=ConfigObject()))
    assert isinstance(method, AWQMethod) and method.config.group_size == 64
    fp8 = resolve_quantization(None, {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    assert isinstance(fp8, Fp8CheckpointMethod) and fp8.config.weight_block_size == (128, 128)
    ct = resolve_quantization(
        None,
        {
            "quantization_config": {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "ignore": ["lm_head"],
                "config_groups": {
                    "g": {
                        "targets": ["Linear"],
                        "weights": {
                            "num_bits": 4,
                            "type": "int",
                            "symmetric": True,
                            "strategy": "group",
                            "group_size": 32,
                        },
                    }
                },
            }
        },
    )
    assert isinstance(ct, CompressedTensorsMethod) and ct.skip("lm_head") and not ct.skip("model.layers.0.o_proj")


def test_requesting_the_checkpoint_method_is_accepted():
    assert isinstance(resolve_quantization("gptq", {"quantization_config": GPTQ}), GPTQMethod)
    assert resolve_quantization("gptq:kernel=torch", {"quantization_config": GPTQ}).config.kernel == "torch"
    with pytest.raises(QuantizationError, match="only the kernel= option"):
        resolve_quantization("gptq:g32", {"quantization_config": GPTQ})
    assert isinstance(
        resolve_quantization("fp8", {"quantization_config": {"quant_method": "fp8"}}), Fp8CheckpointMethod
    )


def test_on_the_fly_requests_and_options():
    assert isinstance(resolve_quantization("int8", {}), Int8Method)
    assert isinstance(resolve_quantization("FP8", {}), Fp8Method)
    assert resolve_quantization("int4", {}).config.group_size == 128
    assert resolve_quantization("int4:g64", {}).config.group_size == 64
    assert resolve_quantization("int4:group_size=32,kernel=torch", {}).config.kernel == "torch"
    assert resolve_quantization("int4", {}, group_size=32).config.group_size == 32
    with pytest.raises(QuantizationError, match="group size"):
        resolve_quantization("int4:g48", {})
    with pytest.raises(QuantizationError, match="option"):
        resolve_quantization("int8:g64", {})
    with pytest.raises(QuantizationError, match="parse"):
        resolve_quantization("int4:fast", {})
    # every on-the-fly option is a field of the method's config, converted to that field's type
    with pytest.raises(QuantizationError, match=r"int8 options are \['kernel', 'lm_head'\].*got \['group_size'\]"):
        resolve_quantization("int8:g64", {})
    with pytest.raises(QuantizationError, match="group_size must be of type int, got 'abc'"):
        resolve_quantization("int4:group_size=abc", {})
    with pytest.raises(QuantizationError, match="kernel must be one of"):
        resolve_quantization("fp8:kernel=fast", {})
    assert resolve_quantization("fp8:kernel=triton", {}).config.kernel == "triton"
    # the output projection stays in full precision unless `lm_head=` names a format
    assert resolve_quantization("int4", {}).ignore == ["lm_head"]
    head = resolve_quantization("int4:g32,lm_head=int8", {})
    assert head.config.lm_head == "int8" and head.ignore == [] and "lm_head int8" in head.describe()
    assert resolve_quantization("int8:lm_head=int8", {}).ignore == []
    with pytest.raises(QuantizationError, match=r"lm_head must be one of \['none', 'int8'\], got 'int4'"):
        resolve_quantization("int8:lm_head=int4", {})
    with pytest.raises(QuantizationError, match=r"lm_head must be one of \['none', 'int8', 'int4'\], got 'fp8'"):
        resolve_quantization("int4:lm_head=fp8", {})
    with pytest.raises(QuantizationError, match="not quantized on the fly"):
        GPTQMethod.from_options({"kernel": "torch"})


def test_int4_group_size_rule():
    assert effective_group_size(4096, 128) == 128
    assert effective_group_size(192, 128) == 64  # largest allowed group <= requested dividing in_features
    assert effective_group_size(96, 128) == 32
    assert effective_group_size(80, 64) == 80  # no allowed group divides 80: one group per row


def test_errors():
    with pytest.raises(QuantizationError, match="unknown quantization 'int3'"):
        resolve_quantization("int3", {})
    with pytest.raises(QuantizationError, match="bitsandbytes"):
        resolve_quantization(None, {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    with pytest.raises(UnsupportedModelError, match="GGUF is not supported; use a safetensors checkpoint"):
        resolve_quantization(None, {"quantization_config": {"quant_method": "gguf"}})
    with pytest.raises(UnsupportedModelError, match="GGUF"):
        resolve_quantization("gguf", {})
    with pytest.raises(QuantizationError, match="already quantized"):
        resolve_quantization("int8", {"quantization_config": GPTQ})
    with pytest.raises(QuantizationError, match="checkpoint format"):
        resolve_quantization("gptq", {})
    with pytest.raises(QuantizationError, match="version 'gemv'"):
        resolve_quantization(None, {"quantization_config": {"quant_method": "awq", "version": "gemv"}})
    with pytest.raises(QuantizationError, match="3 bits"):
        resolve_quantization(None, {"quantization_config": {**GPTQ, "bits": 3}})
    with pytest.raises(QuantizationError, match="marlin"):
        resolve_quantization(None, {"quantization_config": {**GPTQ, "checkpoint_format": "marlin"}})
    with pytest.raises(QuantizationError, match="nvfp4-pack-quantized"):
        resolve_quantization(
            None,
            {
                "quantization_config": {
                    "quant_method": "compressed-tensors",
                    "format": "nvfp4-pack-quantized",
                    "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float"}}},
                }
            },
        )


def test_check_device(monkeypatch):
    for name in ("int8", "int4", "fp8"):
        resolve_quantization(name, {}).check_device(torch.device("cpu"))
        with pytest.raises(QuantizationError, match="use device='cpu'"):
            resolve_quantization(name, {}).check_device(torch.device("mps"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    with pytest.raises(QuantizationError, match="compute capability 7.0"):
        Int4Method().check_device(torch.device("cuda"))


def test_module_matches():
    assert module_matches("hf.lm_head", "lm_head")
    assert module_matches("model.layers.0.mlp.down_proj", "model.layers.0.mlp")
    assert not module_matches("model.layers.10.mlp.down_proj", "model.layers.1")
    assert module_matches("hf.model.layers.3.self_attn.q_proj", "re:.*self_attn.*")
    assert not module_matches("model.lm_head_extra", "lm_head")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(64, 64, bias=True), "gate": nn.Linear(64, 4, bias=False)})
            for _ in range(2)
        )
        self.lm_head = nn.Linear(64, 100, bias=False)


def test_apply_quantization_swaps_on_meta():
    with torch.device("meta"):
        model = Tiny()
    swapped = apply_quantization(model, Int8Method(ignore=["lm_head", "gate"]))
    assert swapped == ["layers.0.q_proj", "layers.1.q_proj"]
    q = model.layers[0]["q_proj"]
    assert isinstance(q, QuantLinearBase) and (q.in_features, q.out_features, q.has_bias) == (64, 64, True)
    assert type(model.layers[0]["gate"]) is nn.Linear and type(model.lm_head) is nn.Linear
    assert not list(q.parameters()) and all(b.is_meta for b in q.buffers())
    assert apply_quantization(model, Int8Method()) == ["layers.0.gate", "layers.1.gate"]  # idempotent on swapped


def test_apply_quantization_judges_fused_linears_by_their_shards():
    class Shard(nn.Module):
        fused_shards = {"qkv_proj": [64, 32, 32]}

        def __init__(self) -> None:
            super().__init__()
            self.qkv_proj = nn.Linear(64, 128, bias=False)

    class Native(nn.Module):
        stacked_params = tuple(
            SimpleNamespace(fused="qkv_proj", shard=s, index=i) for i, s in enumerate(("q_proj", "k_proj", "v_proj"))
        )

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleDict({"self_attn": Shard()}) for _ in range(2))

    def ct(ignore):
        return resolve_quantization(
            None,
            {
                "quantization_config": {
                    "quant_method": "compressed-tensors",
                    "format": "pack-quantized",
                    "ignore": ignore,
                    "config_groups": {
                        "g": {
                            "targets": ["re:.*(q|k|v)_proj$"],
                            "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32},
                        }
                    },
                }
            },
        )

    with torch.device("meta"):
        model = Native()
    swapped = apply_quantization(model, ct(["re:layers.1.self_attn.*"]))  # targets name q/k/v, not qkv_proj
    assert swapped == ["layers.0.self_attn.qkv_proj"]
    assert model.layers[0]["self_attn"].qkv_proj.prefix == "layers.0.self_attn.qkv_proj"
    with torch.device("meta"):
        model = Native()
    with pytest.raises(QuantizationError, match=r"layers.0.self_attn.qkv_proj fuses .*quantizes only some"):
        apply_quantization(model, ct(["layers.0.self_attn.v_proj"]))
