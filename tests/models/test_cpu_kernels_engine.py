"""The engine on our C++ CPU kernels (EngineConfig.cpu_kernels): same greedy tokens as the torch path, the option
in describe(), and the torch path with a reason when the kernels cannot build."""

from __future__ import annotations

import pytest
import torch

from backend import Engine, SamplingParams
from backend.core.errors import EngineError
from backend.layers.activation import KernelActivation
from backend.layers.cpu.fused import FusedLinear, FusedPagedAttention, FusedRMSNorm
from backend.loading.build import choose_cpu_kernels
from flab_kernels.cpu import build

pytestmark = pytest.mark.skipif(
    not build.supported_isas(build.cpu_flags()), reason="the C++ CPU kernels need x86 with AVX2 + FMA"
)

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9] * 7, [11]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


def _tokens(path, **options) -> tuple[list[list[int]], dict]:
    with Engine(str(path), num_kv_blocks=64, **options) as engine:
        outs = engine.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
        return [o.token_ids for o in outs], engine.describe()


NATIVE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"]


@pytest.mark.parametrize(
    "arch", [a if a in ("llama", "qwen3") else pytest.param(a, marks=pytest.mark.slow) for a in NATIVE_FAMILIES]
)
def test_fused_fp32_tokens_equal_the_torch_path_native(tiny_model, arch):
    path = tiny_model(arch)
    fused, info = _tokens(path, model_impl="native", cpu_kernels="fused")
    plain, plain_info = _tokens(path, model_impl="native", cpu_kernels="torch")
    assert info["cpu_kernels"] == "fused" and plain_info["cpu_kernels"] == "torch"
    assert fused == plain


def test_fused_fp32_tokens_equal_the_torch_path_transformers(tiny_model):
    path = tiny_model("llama")
    fused, info = _tokens(path, model_impl="transformers", cpu_kernels="fused")
    plain, _ = _tokens(path, model_impl="transformers", cpu_kernels="torch")
    assert info["cpu_kernels"] == "fused" and "FusedLinear (C++ GEMV for decode rows)" in info["swapped"]
    assert fused == plain


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    from backend.tools.tiny_models import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("bf16") / "llama", dtype=torch.bfloat16)


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_auto_runs_bf16_models_on_the_kernels(bf16_llama, impl):
    with Engine(str(bf16_llama), model_impl=impl, num_kv_blocks=64) as fused:
        info = fused.describe()
        assert info["cpu_kernels"] == "fused" and info["cpu_kernels_reason"].startswith("C++ kernels for")
        modules = list(fused.model.modules())
        assert any(isinstance(m, FusedLinear) for m in modules)
        if impl == "native":
            assert any(isinstance(m, FusedRMSNorm) for m in modules)
            assert any(isinstance(m, FusedPagedAttention) for m in modules)
            acts = [m.act for m in modules if hasattr(m, "act")]
            assert acts and all(isinstance(a, KernelActivation) and a.kind == "silu" for a in acts)
        tokens = [o.token_ids for o in fused.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        # a decode step reads our packed weights (padded to 16 rows), not the oneDNN copies kept for prefill
        assert 0 < fused.decode_weight_bytes < fused.weights_bytes
    plain, _ = _tokens(bf16_llama, model_impl=impl, cpu_kernels="torch")
    # bf16: products summed in another order may round differently; the tiny model's greedy choices are clear
    assert tokens == plain


def test_auto_keeps_fp32_on_torch_and_the_option_is_checked():
    cpu = torch.device("cpu")
    use, reason = choose_cpu_kernels("auto", cpu, torch.float32)
    assert not use and "float32" in reason
    assert choose_cpu_kernels("torch", cpu, torch.bfloat16) == (False, "cpu_kernels='torch'")
    assert not choose_cpu_kernels("fused", cpu, torch.float16)[0]
    with pytest.raises(EngineError, match="cpu_kernels must be one of"):
        Engine("unused", cpu_kernels="fast")


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_no_compiler_falls_back_to_torch_with_the_same_tokens(tiny_model, tmp_path, monkeypatch, caplog, impl):
    """No compiler on PATH and an empty cache (nothing built): a clear message, the torch path, the same tokens."""
    path = tiny_model("llama")
    expected, _ = _tokens(path, model_impl=impl, cpu_kernels="torch")
    monkeypatch.setenv("FLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("CXX", raising=False)
    with caplog.at_level("WARNING"):
        tokens, info = _tokens(path, model_impl=impl, cpu_kernels="fused")
    assert info["cpu_kernels"] == "torch" and "no C++ compiler" in info["cpu_kernels_reason"]
    assert "running the torch path" in caplog.text
    assert tokens == expected


def test_int8_linears_run_the_kernel_with_the_same_tokens(tiny_model):
    path = tiny_model("llama")
    fused, info = _tokens(path, model_impl="native", quantization="int8", cpu_kernels="fused")
    plain, _ = _tokens(path, model_impl="native", quantization="int8", cpu_kernels="torch")
    assert info["cpu_kernels"] == "fused" and info["swapped"]["FusedLinear (C++ GEMV for decode rows)"] > 0
    assert fused == plain


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_linears_run_the_kernel_with_the_same_tokens(tiny_model, dtype):
    """fp32: the same tokens. bf16: the torch path rounds the dequantized weight to bf16 before its product, ours
    keeps code * scale + offset in fp32; the tiny random model's next-token distribution is nearly flat (chosen
    log-probabilities ~ -4.1, the runners-up within 0.01), so greedy paths part at a near-tie after ~8 tokens
    (seen: the 10th): the first 6 tokens of every prompt must agree."""
    path = tiny_model("llama")
    options = dict(model_impl="native", quantization="int4", dtype=dtype)
    fused, info = _tokens(path, cpu_kernels="fused", **options)
    plain, _ = _tokens(path, cpu_kernels="torch", **options)
    assert info["cpu_kernels"] == "fused" and info["swapped"]["FusedLinear (C++ GEMV for decode rows)"] > 0
    if dtype == "float32":
        assert fused == plain
    else:
        assert [t[:6] for t in fused] == [t[:6] for t in plain]


SWEEP_SAMPLE = {  # model type: what it exercises on the fused path (transformers implementation)
    "gemma2": "sliding window + attention softcap",
    "gpt_oss": "attention sinks, MoE",
    "deepseek_v3": "MLA: K and V head sizes differ (a padded cache slot)",
    "gpt_bigcode": "multi-query attention, biases",
    "diffllama": "two attention calls per layer",
    "jetmoe": "kv_channels head size, MoE attention",
}


@pytest.mark.parametrize(
    "model_type",
    [t if t in ("gemma2", "gpt_oss") else pytest.param(t, marks=pytest.mark.slow) for t in SWEEP_SAMPLE],
)
def test_fused_fp32_tokens_equal_the_torch_path_on_a_sample_of_the_sweep(model_type, tmp_path):
    """A sample of the architecture sweep (tests/models/test_arch_sweep.py), transformers implementation, fp32: the
    same greedy tokens on our C++ kernels (linears, and attention where it runs them) as on the torch path."""
    from tests.models.arch_sweep import build_sweep_model

    path = tmp_path / model_type
    _, built = build_sweep_model(model_type, path)
    assert built
    fused, info = _tokens(path, model_impl="transformers", dtype="float32", cpu_kernels="fused")
    plain, _ = _tokens(path, model_impl="transformers", dtype="float32", cpu_kernels="torch")
    assert info["cpu_kernels"] == "fused"
    assert fused == plain
