"""16-bit linears on CPU: UpcastLinear (fp32 (K, N) copy for many-row products) and PackedLinear (oneDNN prepacked)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import grouped_mm_experts_forward

from backend import Engine, SamplingParams
from backend.core.errors import EngineError
from backend.layers.cpu.packed import PackedLinear, pack_linears, packing_available
from backend.layers.cpu.packed_experts import EXPERTS_NAME, pack_hf_experts, packed_experts_forward
from backend.layers.cpu.siblings import SiblingLinear, fuse_siblings
from backend.layers.cpu.upcast import MAX_HALF_ROWS, UpcastLinear, half_linears, upcast_linears
from backend.loading.build import choose_cpu_linear
from backend.loading.tiny_models import build_tiny_model


def _linear(bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 48, bias=bias).to(torch.bfloat16)


@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_use_the_16bit_weight_many_rows_the_fp32_copy(bias):
    layer = _linear(bias)
    plain = nn.Linear(64, 48, bias=bias).to(torch.bfloat16)
    plain.load_state_dict(layer.state_dict())
    assert upcast_linears(half_linears(nn.Sequential(layer))) == 1 and type(layer) is UpcastLinear
    assert layer.weight_t.shape == (64, 48) and layer.weight_t.dtype == torch.float32
    assert "weight_t" not in layer.state_dict()  # never saved: rebuilt from the 16-bit weight
    x = torch.randn(MAX_HALF_ROWS, 64).to(torch.bfloat16)
    assert torch.equal(layer(x), plain(x))  # decode rows: the 16-bit path, bit for bit
    x = torch.randn(2, 5, 64).to(torch.bfloat16)  # 10 rows: fp32 product, one rounding to bf16
    ref = F.linear(x.float(), plain.weight.float(), None if plain.bias is None else plain.bias.float())
    out = layer(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0, rtol=2**-8)  # half a bf16 ulp


def test_only_plain_16bit_linears_are_upcast():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.float16), nn.Linear(8, 8).to(torch.bfloat16))
    assert upcast_linears(half_linears(model)) == 2
    assert [type(m) for m in model] == [nn.Linear, UpcastLinear, UpcastLinear]


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16") / "llama"
    build_tiny_model("llama", path, dtype=torch.bfloat16)
    return str(path)


def test_engine_upcast_on_and_off(bf16_llama):
    on = Engine(bf16_llama, device="cpu", cpu_linear="upcast", cpu_kernels="torch", num_kv_blocks=64)
    off = Engine(bf16_llama, device="cpu", cpu_linear="none", cpu_kernels="torch", num_kv_blocks=64)
    try:
        assert on.describe()["cpu_linear"] == "upcast" and on.describe()["attention_compute_dtype"] == "float32"
        assert off.describe()["cpu_linears"] == 0 and off.describe()["attention_compute_dtype"] == "bfloat16"
        linears = [m for m in on.model.modules() if isinstance(m, UpcastLinear)]
        assert on.describe()["cpu_linears"] == len(linears) > 0
        assert "UpcastLinear (fp32 copy for CPU matmuls)" in on.describe()["swapped"]
        extra = sum(m.weight.numel() * 4 + (0 if m.bias is None else m.bias.numel() * 4) for m in linears)
        assert on.weights_bytes == off.weights_bytes + extra  # the fp32 copies are counted
        (embedding,) = [m.weight for m in on.model.modules() if isinstance(m, torch.nn.Embedding)]  # untied
        # a 1-row decode reads the 16-bit weights, not the embedding table
        assert on.decode_weight_bytes == off.weights_bytes - embedding.numel() * embedding.element_size()
        assert off.decode_weight_bytes == on.decode_weight_bytes
        params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
        a = on.generate("the cat sat on", params)[0]
        b = off.generate("the cat sat on", params)[0]
        assert len(a.token_ids) == len(b.token_ids) == 12
        on.check_invariants()
    finally:
        on.close()
        off.close()


needs_packing = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN linear prepacking")


@needs_packing
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(dtype, bias):
    if not packing_available(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU (fp16 needs AVX512-FP16 or AVX-NE-CONVERT)")
    torch.manual_seed(0)
    layer = nn.Linear(64, 48, bias=bias).to(dtype)
    ref = nn.Linear(64, 48, bias=bias).to(dtype)
    ref.load_state_dict(layer.state_dict())
    model = nn.Sequential(layer)
    assert pack_linears(model, half_linears(model)) == 1
    packed = model[0]
    assert type(packed) is PackedLinear and packed.shared_weight is None
    assert "packed" not in packed.state_dict() and not any(p.shape == (48, 64) for p in packed.parameters())
    assert torch.equal(packed.weight, ref.weight)  # the packed layout converts back exactly
    for shape in [(1, 64), (3, 64), (2, 7, 64), (40, 64)]:
        x = torch.randn(*shape).to(dtype)
        out = packed(x)
        assert out.shape == (*shape[:-1], 48) and out.dtype == dtype
        # oneDNN behind both calls: equal up to its choice of kernel per shape (fp32 accumulation, one rounding)
        torch.testing.assert_close(out.float(), ref(x).float(), atol=1e-6, rtol=2**-7)


@needs_packing
def test_packing_keeps_a_tied_weight_shared():
    emb = nn.Embedding(32, 16).to(torch.bfloat16)
    head = nn.Linear(16, 32, bias=False).to(torch.bfloat16)
    head.weight = emb.weight
    model = nn.ModuleDict(dict(emb=emb, head=head, other=nn.Linear(16, 16).to(torch.bfloat16)))
    assert pack_linears(model, half_linears(model)) == 2
    assert model["head"].shared_weight is emb.weight  # the embedding still reads it
    assert model["other"].shared_weight is None
    x = torch.randn(5, 16).to(torch.bfloat16)
    torch.testing.assert_close(model["head"](x).float(), F.linear(x, emb.weight).float(), atol=1e-6, rtol=2**-7)


def test_packing_is_checked_per_dtype(monkeypatch):
    """A CPU that packs bf16 but not fp16 (AVX512-BF16 without AVX512-FP16): an fp16 model takes the fp32 copies in
    auto mode, and asking for 'packed' says why it cannot."""
    import backend.loading.build as build

    monkeypatch.setattr(build, "packing_available", lambda dtype=torch.bfloat16: dtype == torch.bfloat16)
    monkeypatch.setattr(build, "cpu_has_fast_half_matmul", lambda: True)
    cpu = torch.device("cpu")
    assert build.choose_cpu_linear("auto", cpu, torch.bfloat16) == "packed"
    assert build.choose_cpu_linear("auto", cpu, torch.float16) == "upcast"
    with pytest.raises(EngineError, match="prepacking for float16.*AVX512-FP16"):
        build.choose_cpu_linear("packed", cpu, torch.float16)


def test_cpu_linear_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_cpu_linear("auto", cpu, torch.float32) == "none"  # fp32 models: F.linear, bit-equal to HF
    assert choose_cpu_linear("packed", cuda, torch.bfloat16) == "none"
    assert choose_cpu_linear("upcast", cpu, torch.bfloat16) == "upcast"
    assert choose_cpu_linear("auto", cpu, torch.bfloat16) in ("packed", "upcast", "none")
    with pytest.raises(EngineError, match="cpu_linear must be one of"):
        Engine("unused", cpu_linear="fast")


@needs_packing
@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_engine_packed_equals_plain(bf16_llama, impl):
    options = dict(device="cpu", model_impl=impl, cpu_kernels="torch", num_kv_blocks=64)
    packed = Engine(bf16_llama, cpu_linear="packed", **options)
    plain = Engine(bf16_llama, cpu_linear="none", **options)
    try:
        assert (
            packed.describe()["cpu_linear"] == "packed" and packed.describe()["attention_compute_dtype"] == "bfloat16"
        )
        linears = [m for m in packed.model.modules() if isinstance(m, (PackedLinear, SiblingLinear))]
        assert packed.describe()["cpu_linears"] == len(linears) > 0
        swapped = packed.describe()["swapped"]
        assert "PackedLinear (oneDNN prepacked 16-bit weight)" in swapped
        # transformers' separate q/k/v and gate/up share one product each; native models fused them at load
        siblings = swapped.get("SiblingLinear (q/k/v or gate/up as one oneDNN product)", 0)
        assert siblings == (5 * packed.describe()["layers"] if impl == "transformers" else 0)
        assert packed.describe()["parameters"] == plain.describe()["parameters"]
        (embedding,) = {
            id(m.weight): m.weight for m in plain.model.modules() if isinstance(m, torch.nn.Embedding)
        }.values()
        # a 1-row decode reads every weight (the packed copies) but the (untied) embedding table
        assert packed.decode_weight_bytes == plain.weights_bytes - embedding.numel() * embedding.element_size()
        params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
        prompts = ["the cat sat on", "a b c d e f g h i j k"]
        a = packed.generate(prompts, params)
        b = plain.generate(prompts, params)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]  # same oneDNN products, same tokens
        packed.check_invariants()
    finally:
        packed.close()
        plain.close()


@needs_packing
@pytest.mark.parametrize(
    "arch,impl",
    [
        ("gpt2", "transformers"),
        ("phi", "transformers"),
        ("gemma2", "native"),
        ("mixtral", "native"),
        ("qwen2_moe", "transformers"),
        ("qwen2", "transformers"),
    ],
)
def test_packed_tokens_across_architectures(tmp_path, arch, impl):
    """Biases, tied heads, Conv1D models (only the head is an nn.Linear), MoE experts, q/k/v siblings with biases:
    same greedy tokens."""
    path = build_tiny_model(arch, tmp_path / arch, dtype=torch.bfloat16)
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    outs = {}
    for mode in ("packed", "none"):
        with Engine(str(path), model_impl=impl, cpu_linear=mode, cpu_kernels="torch", num_kv_blocks=64) as engine:
            outs[mode] = [o.token_ids for o in engine.generate(["the cat sat on the mat", "1 2 3"], params)]
            if mode == "packed":
                assert engine.describe()["cpu_linears"] > 0
    assert outs["packed"] == outs["none"]


class _Attention(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(64, n, bias=bias) for n in (64, 16, 16))
        self.o_proj = nn.Linear(64, 64, bias=bias)


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
def test_siblings_share_one_product(bias):
    torch.manual_seed(0)
    ref = _Attention(bias).to(torch.bfloat16)
    separate, model = _Attention(bias).to(torch.bfloat16), _Attention(bias).to(torch.bfloat16)
    for m in (separate, model):
        m.load_state_dict(ref.state_dict())
        pack_linears(m, half_linears(m))
    assert fuse_siblings(model) == 3 and type(model.o_proj) is PackedLinear  # o_proj has no sibling
    q, k, v = model.q_proj, model.k_proj, model.v_proj
    assert q.product is k.product is v.product and [m.out_features for m in (q, k, v)] == [64, 16, 16]
    # the group's packed weight (and bias) are registered once, on its first member
    expected = ["q_proj.packed"] + (["q_proj.fused_bias"] if bias else []) + ["o_proj.packed"]
    assert [name for name, _ in model.named_buffers()] == expected
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(model, name).weight, getattr(ref, name).weight)
    for rows in (1, 5, 33):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        fused = (q(x), k(x), v(x))
        assert q.product.input is None and q.product.output is None  # the last sibling let go of the product
        for out, name in zip(fused, ("q_proj", "k_proj", "v_proj")):
            assert torch.equal(out, getattr(separate, name)(x))  # decode sizes: bit for bit
    # called out of order or on another input, a sibling computes its own product: still correct
    x, y = torch.randn(3, 64).to(torch.bfloat16), torch.randn(3, 64).to(torch.bfloat16)
    q(x)
    assert torch.equal(k(y), separate.k_proj(y)) and torch.equal(v(y), separate.v_proj(y))


@needs_packing
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_native_moe_experts_are_packed(tmp_path, arch):
    """Stacked expert weights: one packed tensor per expert replaces the stacked parameter (meta placeholder of
    the same shape), the parameter count and weight bytes stay those of the plain model, tokens are the same."""
    path = build_tiny_model(arch, tmp_path / arch, dtype=torch.bfloat16)
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    with (
        Engine(str(path), model_impl="native", cpu_linear="packed", cpu_kernels="torch", num_kv_blocks=64) as packed,
        Engine(str(path), model_impl="native", cpu_linear="none", cpu_kernels="torch", num_kv_blocks=64) as plain,
    ):
        experts = [m for m in packed.model.modules() if type(m).__name__ == "Experts"]
        assert experts and all(m.flab_packed is not None and m.gate_up_proj.is_meta for m in experts)
        assert packed.describe()["swapped"]["MoE experts (oneDNN prepacked per expert)"] == len(experts)
        assert packed.describe()["parameters"] == plain.describe()["parameters"]
        assert packed.weights_bytes == plain.weights_bytes
        prompts = ["the cat sat on the mat", "1 2 3"]
        assert [o.token_ids for o in packed.generate(prompts, params)] == [
            o.token_ids for o in plain.generate(prompts, params)
        ]


@needs_packing
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_transformers_moe_experts_are_packed(tmp_path, arch):
    """A transformers model's experts modules get per-expert packed weights and our experts function through
    transformers' ExpertsInterface; the outputs are bit for bit grouped_mm's (gpt_oss: transposed layout with
    biases), so the greedy tokens and every logit are the same."""
    path = build_tiny_model(arch, tmp_path / arch, dtype=torch.bfloat16)
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    blocks = dict(num_kv_blocks=64)
    with (
        Engine(str(path), model_impl="transformers", cpu_linear="packed", cpu_kernels="torch", **blocks) as packed,
        Engine(str(path), model_impl="transformers", cpu_linear="none", cpu_kernels="torch", **blocks) as plain,
    ):
        hf = packed.model.hf
        modules = [m for m in hf.modules() if getattr(m, "flab_packed", None) is not None]
        assert modules and hf.config._experts_implementation == EXPERTS_NAME
        assert plain.model.hf.config._experts_implementation != EXPERTS_NAME
        assert packed.describe()["swapped"]["MoE experts (oneDNN prepacked per expert)"] == len(modules)
        assert packed.describe()["parameters"] == plain.describe()["parameters"]
        assert packed.weights_bytes == plain.weights_bytes
        prompts = ["the cat sat on the mat", "1 2 3"]
        a, b = packed.generate(prompts, params), plain.generate(prompts, params)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        assert [o.logprobs for o in a] == [o.logprobs for o in b]
        # one module against transformers' own grouped_mm on the same stacked weights
        experts = [m for m in plain.model.hf.modules() if hasattr(m, "is_transposed")][0]
        torch.manual_seed(0)
        x = torch.randn(7, experts.gate_up_proj.shape[-1 if not experts.is_transposed else 1]).to(torch.bfloat16)
        ids = torch.randint(0, experts.num_experts, (7, 2))
        weights = torch.rand(7, 2)
        ref = grouped_mm_experts_forward(experts, x, ids, weights)
        assert pack_hf_experts(plain.model) == len(modules)
        assert torch.equal(packed_experts_forward(experts, x, ids, weights), ref)
