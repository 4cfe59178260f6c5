"""End to end through the engine's streaming loader: a tiny HF llama built on meta, swapped, streamed, run."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from backend.loading.tiny_models import build_tiny_model
from backend.models.checkpoint import StreamingLoader, materialize_leftovers
from backend.quantization import apply_quantization, resolve_quantization
from backend.quantization.base import QuantLinearBase
from backend.tools.export_quantized import export_checkpoint

IDS = torch.tensor([[1, 5, 9, 30, 44, 100, 7, 8]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    fp = build_tiny_model("llama", root / "fp")
    paths = {"fp": fp, "tied": build_tiny_model("llama", root / "tied", tie_word_embeddings=True)}
    for fmt in ("gptq", "awq", "compressed-tensors", "fp8"):
        paths[fmt] = root / fmt
        export_checkpoint(fp, paths[fmt], fmt, bits=4, group_size=32, block=(32, 32))
    return paths


def load_quantized(path, requested):
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
    method = resolve_quantization(requested, config)
    swapped = apply_quantization(model, method)
    report = StreamingLoader(model, torch.device("cpu"), torch.float32).load(path)
    materialize_leftovers(model, report, torch.device("cpu"), str(path))
    return model.eval(), swapped, report


@pytest.mark.parametrize(
    "checkpoint,requested,max_rel",
    [
        ("fp", "int8", 0.05),
        ("fp", "int4", 0.5),
        ("fp", "fp8", 0.2),
        ("gptq", None, 0.5),
        ("awq", None, 0.5),
        ("compressed-tensors", None, 0.5),
        ("fp8", None, 0.2),
    ],
)
def test_loads_and_matches_dequantized_model(checkpoints, checkpoint, requested, max_rel):
    model, swapped, report = load_quantized(checkpoints[checkpoint], requested)
    assert len(swapped) == 14 and not report.unexpected  # 2 layers x 7 projections; lm_head stays
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    full = AutoModelForCausalLM.from_pretrained(checkpoints["fp"], dtype=torch.float32).eval()
    dequantized = copy.deepcopy(full)
    for prefix in swapped:
        module = model.get_submodule(prefix)
        assert isinstance(module, QuantLinearBase)
        dequantized.get_submodule(prefix).weight.data = module.dequantize()
    with torch.no_grad():
        out, ref, base = model(IDS).logits, dequantized(IDS).logits, full(IDS).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # the quantized model is its dequantized weights
    assert ((out - base).norm() / base.norm()).item() < max_rel  # and close to full precision (random tiny model)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    "requested,bits", [("int4:g32,lm_head=int8", 8), ("int4:g32,lm_head=int4", 4), ("int8:lm_head=int8", 8)]
)
def test_a_quantized_lm_head(checkpoints, requested, bits, tied):
    """`lm_head=`: the output projection quantized too, from its own weight or, tied to the embedding, from the
    embedding's tensor (the checkpoint has no lm_head then); the embedding itself stays in full precision."""
    path = checkpoints["tied" if tied else "fp"]
    model, swapped, report = load_quantized(path, requested)
    assert len(swapped) == 15 and "lm_head" in swapped and not report.unexpected
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lm_head, embed = model.get_submodule("lm_head"), model.get_input_embeddings().weight
    assert isinstance(lm_head, QuantLinearBase) and lm_head.bits == bits
    torch.testing.assert_close(embed, full.get_input_embeddings().weight, rtol=0, atol=0)
    ref = full.get_output_embeddings().weight
    rel = ((lm_head.dequantize() - ref).norm() / ref.norm()).item()
    assert 0 < rel < (0.02 if bits == 8 else 0.2)


@pytest.mark.parametrize(
    "checkpoint,requested",
    [
        ("fp", "int4:g32"),
        ("fp", "int4:g32,lm_head=int8"),
        ("tied", "int4:g32,lm_head=int8"),
        ("gptq", None),
        ("fp8", None),
    ],
)
def test_engine_native_and_transformers_agree(checkpoints, checkpoint, requested):
    """The same quantization layer under both implementations (native fuses q/k/v and gate/up shards)."""
    from backend import Engine, SamplingParams

    tokens = {}
    for impl in ("native", "transformers"):
        engine = Engine(
            str(checkpoints[checkpoint]),
            model_impl=impl,
            quantization=requested,
            dtype="float32",
            device="cpu",
            num_kv_blocks=32,
            max_model_len=128,
        )
        try:
            outs = engine.generate(
                ["Hello world! Once upon", "1 2 3"], SamplingParams(max_new_tokens=6, temperature=0.0)
            )
            tokens[impl] = [o.token_ids for o in outs]
        finally:
            engine.close()
    assert tokens["native"] == tokens["transformers"]
