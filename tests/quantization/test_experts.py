"""MoE experts quantized on the fly (backend/quantization/experts.py): per expert, the linears' own quantized modules.

(a) forward == the same experts with the dequantized weights, native and transformers experts modules;
(b) native and transformers engines quantize the same expert weights identically and give the same greedy tokens;
(c) weight bytes drop by exactly the quantized layout's size; (d) tensor parallelism loads them (no refusal); a
GPTQ checkpoint with quantized experts is refused.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from backend import Engine, SamplingParams
from backend.core.config import EngineConfig
from backend.core.errors import QuantizationError
from backend.layers.cpu.packed_experts import EXPERTS_NAME
from backend.loading.build import load_model
from backend.loading.tiny_models import build_tiny_model
from backend.models.moe import Experts
from backend.quantization import QuantizedExperts, quantize_experts, resolve_quantization
from backend.quantization.experts import experts_sites
from backend.tools.export_quantized import export_checkpoint, linear_tensors
from tests.quantization.common import REL_TOL, rel_err

E, H, INTER, TOP_K, T = 4, 64, 32, 2, 9
METHODS = ["int8", "int4:g32", "fp8"]


@pytest.fixture(scope="module")
def moe_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {arch: build_tiny_model(arch, root / arch) for arch in ("mixtral", "qwen2_moe")}


def _routing(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)  # (T, H)
    probs = torch.softmax(torch.randn(T, E, generator=g), dim=-1)
    weights, ids = torch.topk(probs, TOP_K, dim=-1)  # (T, K)
    return x, weights, ids


def _native_experts(dtype: torch.dtype) -> Experts:
    g = torch.Generator().manual_seed(1)
    experts = Experts(E, H, INTER, "silu")
    experts.gate_up_proj.data = (torch.randn(E, 2 * INTER, H, generator=g) * 0.1).to(dtype)
    experts.down_proj.data = (torch.randn(E, H, INTER, generator=g) * 0.1).to(dtype)
    return experts


def _dequantized_stacks(holder: QuantizedExperts) -> tuple[torch.Tensor, torch.Tensor]:  # (E, N, K) each, fp32
    return tuple(torch.stack([m.dequantize() for m in linears]) for linears in (holder.up, holder.down))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("request_", METHODS)
def test_native_experts_forward_is_the_dequantized_experts(dtype, request_):
    experts = _native_experts(dtype)
    dense_bytes = sum(p.numel() * p.element_size() for p in experts.parameters())
    assert quantize_experts(experts, resolve_quantization(request_, {})) == 1
    holder = experts.flab_quantized
    assert isinstance(holder, QuantizedExperts) and holder.num_experts == E
    assert experts.gate_up_proj.is_meta and experts.down_proj.is_meta  # the dense weights are dropped
    assert tuple(experts.gate_up_proj.shape) == (E, 2 * INTER, H)  # placeholders keep the shape
    expected_kernel = "torch" if dtype == torch.float32 or request_ == "fp8" else None
    if expected_kernel:
        assert holder.up[0].kernel == expected_kernel
    else:  # 16-bit activations: the CPU pack kernels the linears use
        assert holder.up[0].kernel == ("cpu_int8pack" if request_ == "int8" else "cpu_int4pack")
    reference = Experts(E, H, INTER, "silu")
    up, down = _dequantized_stacks(holder)
    reference.gate_up_proj.data, reference.down_proj.data = up, down  # fp32 reference
    x, weights, ids = _routing()
    with torch.no_grad():
        y = experts(x.to(dtype), weights, ids)
        ref = reference(x.to(dtype).float(), weights, ids)
    assert y.shape == (T, H) and y.dtype == dtype
    # bf16: activations, the intermediate and the output are rounded to bf16 along the way (two products)
    assert rel_err(y, ref) < REL_TOL[dtype] * (1 if dtype == torch.float32 else 2), rel_err(y, ref)
    # bytes: the quantized buffers replace the dense stacks
    quant_bytes = sum(b.numel() * b.element_size() for b in holder.buffers())
    assert quant_bytes < dense_bytes


def test_transformers_experts_forward_is_the_dequantized_experts(moe_paths):
    """Through transformers' ExpertsInterface: the quantized module against transformers' own grouped_mm on the
    dequantized stacked weights."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(moe_paths["mixtral"], dtype=torch.float32).eval()
    module = [m for m in hf.modules() if hasattr(m, "is_transposed")][0]
    reference = AutoModelForCausalLM.from_pretrained(moe_paths["mixtral"], dtype=torch.float32).eval()
    ref_module = [m for m in reference.modules() if hasattr(m, "is_transposed")][0]
    assert quantize_experts(hf, resolve_quantization("int4:g32", {})) == 2
    assert hf.config._experts_implementation == EXPERTS_NAME
    up, down = _dequantized_stacks(module.flab_quantized)
    ref_module.gate_up_proj.data, ref_module.down_proj.data = up, down
    x, weights, ids = _routing(3)
    x = x[:, : module.hidden_dim]
    with torch.no_grad():
        y = module(x, ids, weights)
        ref = ref_module(x, ids, weights)
    assert rel_err(y, ref) < REL_TOL[torch.float32], rel_err(y, ref)


def _engine(path, impl: str, quantization: str | None) -> Engine:
    return Engine(
        str(path),
        model_impl=impl,
        quantization=quantization,
        dtype="float32",
        device="cpu",
        num_kv_blocks=32,
        max_model_len=128,
    )


def _holders(engine: Engine) -> list[QuantizedExperts]:
    return [m for m in engine.model.modules() if isinstance(m, QuantizedExperts)]


@pytest.mark.parametrize(
    "arch,request_",
    [("mixtral", "int4:g32"), ("qwen2_moe", "int8"), pytest.param("mixtral", "fp8", marks=pytest.mark.slow)],
)
def test_native_and_transformers_quantize_experts_identically(moe_paths, arch, request_):
    prompts = ["Hello world! Once upon", "1 2 3"]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    tokens, stacks = {}, {}
    for impl in ("native", "transformers"):
        with _engine(moe_paths[arch], impl, request_) as engine:
            holders = _holders(engine)
            info = engine.describe()["quantized_experts"]
            assert len(holders) == info["modules"] == 2 and info["method"] == request_.partition(":")[0]
            stacks[impl] = [_dequantized_stacks(h) for h in holders]
            tokens[impl] = [o.token_ids for o in engine.generate(prompts, params)]
    for native, hf in zip(stacks["native"], stacks["transformers"]):
        assert torch.equal(native[0], hf[0]) and torch.equal(native[1], hf[1])  # the same weights, bit for bit
    assert tokens["native"] == tokens["transformers"]


def _dense_and_quantized_bytes(engine: Engine) -> tuple[int, int]:
    """fp32 bytes of every weight quantized (linears and experts) and the bytes of their quantized buffers."""
    dense = quantized = 0
    for m in engine.model.modules():
        if hasattr(m, "load_tensor"):
            dense += m.in_features * m.out_features * 4
            quantized += sum(b.numel() * b.element_size() for name, b in m.named_buffers() if name != "bias")
    return dense, quantized


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_weights_bytes_drop(moe_paths, impl):
    path = moe_paths["mixtral"]
    with _engine(path, impl, None) as full:
        full_bytes = full.weights_bytes
        experts_bytes = sum(
            getattr(s.module, n).numel() * 4 for s in experts_sites(full.model) for n in (s.up_name, "down_proj")
        )
    ratios = {}
    for request_ in ("int8", "int4:g32"):
        with _engine(path, impl, request_) as engine:
            dense, quantized = _dense_and_quantized_bytes(engine)
            assert dense > experts_bytes  # the experts are among the quantized weights (with the linears)
            assert engine.weights_bytes == full_bytes - dense + quantized
            assert engine.describe()["weights_bytes"] == engine.weights_bytes
            ratios[request_] = quantized / dense
    # int8: 1 byte per weight + one fp32 scale per output row; int4 g32: half a byte + fp32 scale and zero per 32
    assert 0.25 <= ratios["int8"] <= 0.25 + 1 / 32
    assert 0.125 <= ratios["int4:g32"] <= 0.125 + 2 / 32


def test_full_precision_moe_is_untouched(moe_paths):
    with _engine(moe_paths["mixtral"], "native", None) as engine:
        assert not _holders(engine) and "quantized_experts" not in engine.describe()
        assert all(not e.gate_up_proj.is_meta for e in engine.model.modules() if isinstance(e, Experts))


def test_tensor_parallel_with_quantized_experts_loads(moe_paths):
    """No refusal for tp_size > 1: each rank loads the whole model with its experts quantized, then slices every
    expert's quantized linears (backend/distributed/experts.py; end to end in tests/distributed/test_tp_engine.py)."""
    cfg = EngineConfig(model=str(moe_paths["mixtral"]), quantization="int8", tp_size=2, dtype="float32")
    loaded = load_model(cfg)
    holders = [m for m in loaded.model.modules() if isinstance(m, QuantizedExperts)]
    assert holders and all(h.method == "int8" for h in holders)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "fp8"])
def test_checkpoint_with_quantized_experts_is_refused(moe_paths, tmp_path, fmt):
    """A quantized checkpoint whose experts are quantized too: refused (experts load only in full precision; the
    FP8 one used to load its e4m3 codes without their scales, silently wrong); one whose experts are full
    precision (only the linears quantized) still loads."""
    dense_experts = tmp_path / "linears"
    export_checkpoint(moe_paths["mixtral"], dense_experts, fmt, bits=4, group_size=32, block=(32, 32))
    with Engine(str(dense_experts), model_impl="native", dtype="float32", num_kv_blocks=32) as engine:
        assert engine.generate(["1 2 3"], SamplingParams(max_new_tokens=2))[0].token_ids
    quantized_experts = tmp_path / "experts"
    quantized_experts.mkdir()
    tensors = load_file(str(dense_experts / "model.safetensors"))
    for name in [n for n in tensors if ".experts." in n and n.endswith(".weight")]:
        for suffix, t in linear_tensors(fmt, tensors.pop(name), bits=4, group_size=32, block=(32, 32)).items():
            tensors[f"{name.removesuffix('.weight')}.{suffix}"] = t
    save_file(tensors, str(quantized_experts / "model.safetensors"))
    for file in dense_experts.iterdir():
        if file.suffix != ".safetensors":
            (quantized_experts / file.name).write_bytes(file.read_bytes())
    assert "quantization_config" in json.loads((quantized_experts / "config.json").read_text())
    assert AutoConfig.from_pretrained(quantized_experts).quantization_config["quant_method"] == fmt
    for impl in ("native", "transformers"):
        with pytest.raises(QuantizationError, match="quantizes the MoE experts"):
            _engine(quantized_experts, impl, None)


def _stacked_checkpoint(per_expert, folder):
    """The same model saved with transformers 5's stacked expert tensors (`experts.gate_up_proj`, (E, 2I, H)):
    names that match the transformers model, so the streaming loader (not transformers' converter) reads it."""
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(per_expert, folder)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    model = AutoModelForCausalLM.from_pretrained(per_expert, dtype=torch.float32)
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight" or not model.config.tie_word_embeddings
    }
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    return folder


def _dense_when_quantized(monkeypatch) -> list[int]:
    """Spy: for each experts module quantized, how many experts modules then hold full-precision weights."""
    import backend.quantization as quantization
    import backend.quantization.experts as experts_mod

    seen: list[int] = []
    real = experts_mod._quantize_site

    def spy(site, method):
        model_sites = experts_sites(spy.root) if spy.root is not None else [site]
        seen.append(sum(not getattr(s.module, s.up_name).is_meta for s in model_sites))
        real(site, method)

    spy.root = None
    real_init = experts_mod.ExpertsQuantizer.__init__

    def init(self, model, method):
        spy.root = model
        real_init(self, model, method)

    def after_loading(model, method):  # what the loader calls once the whole model has loaded
        spy.root = model
        return real_after(model, method)

    real_after = quantization.quantize_experts
    monkeypatch.setattr(experts_mod, "_quantize_site", spy)
    monkeypatch.setattr(experts_mod.ExpertsQuantizer, "__init__", init)
    monkeypatch.setattr(quantization, "quantize_experts", after_loading)
    return seen


@pytest.mark.parametrize(
    "impl, layout",
    [("native", "per-expert"), ("transformers", "per-expert"), ("transformers", "stacked")],
)
def test_experts_are_quantized_while_the_checkpoint_streams(moe_paths, tmp_path, monkeypatch, impl, layout):
    """Each layer's experts are quantized as soon as they have loaded: no two layers' experts are ever at full
    precision at once (per-expert tensors stream into the stacked experts: backend/loading/conversions.py); the
    result is the same as quantizing after transformers' own converter has loaded the whole model."""
    import backend.loading.build as build

    path = moe_paths["mixtral"] if layout == "per-expert" else _stacked_checkpoint(moe_paths["mixtral"], tmp_path / "s")
    seen = _dense_when_quantized(monkeypatch)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    with _engine(path, impl, "int8") as engine:
        assert seen == [1, 1]  # two layers, each quantized alone (after loading it would be [2, 1])
        streamed = [_dequantized_stacks(h) for h in _holders(engine)]
        tokens = engine.generate(["Hello world! Once upon"], params)[0].token_ids
    seen.clear()
    monkeypatch.setattr(build, "streamable", lambda *a: None)  # transformers' converter: the whole model first
    with _engine(moe_paths["mixtral"], "transformers", "int8") as after:
        assert seen == [2, 1]
        for mine, theirs in zip(streamed, [_dequantized_stacks(h) for h in _holders(after)]):
            assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
        assert after.generate(["Hello world! Once upon"], params)[0].token_ids == tokens
