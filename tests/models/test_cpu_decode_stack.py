"""The C++ decode stack (backend/layers/cpu/decode_stack.py): which native models get it, the same bits as the
per-module path on our kernels (logprobs of every chosen token compared exactly), and the steps it leaves to
the modules (prefill, more rows than our products take, a hooked attention module such as the lab's trace)."""

from __future__ import annotations

import pytest

from backend import Engine, SamplingParams
from flab_kernels.cpu import build

pytestmark = pytest.mark.skipif(
    not build.supported_isas(build.cpu_flags()), reason="the C++ CPU kernels need x86 with AVX2 + FMA"
)

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9] * 7, [11]]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)


class CountingStack:
    """Stands in for the C++ DecodeStack object: counts the steps it runs and their row counts."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.rows: list[int] = []

    def forward(self, h, *args):
        self.rows.append(h.shape[0])
        return self.inner.forward(h, *args)


def _run(engine: Engine, prompts=PROMPTS, params=GREEDY) -> list[tuple[list[int], list[float]]]:
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    return [(list(o.token_ids), list(o.logprobs)) for o in outs]


def _stack_and_modules(engine: Engine, prompts=PROMPTS):
    """The same requests with the decode stack and without it (the per-module path), from a fresh prefix cache."""
    model = engine.model.model
    stack = model.cpu_decode
    assert stack is not None
    counting = CountingStack(stack.stack)
    stack.stack = counting
    with_stack = _run(engine, prompts)
    engine.reset_prefix_cache()
    model.cpu_decode = None
    try:
        without = _run(engine, prompts)
    finally:
        model.cpu_decode = stack
        stack.stack = counting.inner
    return with_stack, without, counting.rows


@pytest.mark.parametrize(
    "arch,dtype",
    [
        ("llama", "float32"),
        ("llama", "bfloat16"),
        ("qwen3", "bfloat16"),  # per-head q / k norms
        pytest.param("qwen2", "bfloat16", marks=pytest.mark.slow),  # qkv bias
        pytest.param("mistral", "bfloat16", marks=pytest.mark.slow),  # sliding window
    ],
)
def test_the_stack_gives_the_per_module_paths_bits(tiny_model, arch, dtype):
    with Engine(str(tiny_model(arch)), model_impl="native", dtype=dtype, cpu_kernels="fused", num_kv_blocks=64) as e:
        assert "through every layer in one C++ call" in e.describe()["cpu_kernels_reason"]
        with_stack, without, rows = _stack_and_modules(e)
    assert len(rows) == GREEDY.max_new_tokens - 1  # every decode step of the 3 requests took the stack
    assert with_stack == without  # tokens and the logprob of each, bit for bit


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_linears_in_the_stack(tiny_model, quantization):
    path = tiny_model("llama")
    with Engine(str(path), model_impl="native", quantization=quantization, cpu_kernels="fused", num_kv_blocks=64) as e:
        with_stack, without, rows = _stack_and_modules(e)
    assert rows and with_stack == without


@pytest.mark.parametrize("arch", ["gemma2", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_other_shapes_keep_the_per_module_path(tiny_model, arch):
    """Sandwich norms (Gemma 2) and MoE MLPs (Mixtral) are not the stack's shape: no stack, the modules run."""
    with Engine(str(tiny_model(arch)), model_impl="native", cpu_kernels="fused", num_kv_blocks=64) as e:
        info = e.describe()
        assert info["cpu_kernels"] == "fused" and "one C++ call" not in info["cpu_kernels_reason"]
        assert e.model.model.cpu_decode is None


def test_the_torch_path_has_no_stack(tiny_model):
    with Engine(str(tiny_model("llama")), model_impl="native", cpu_kernels="torch", num_kv_blocks=64) as e:
        assert e.model.model.cpu_decode is None


@pytest.mark.parametrize(
    "dtype,quantization", [("bfloat16", None), ("float32", None), ("float32", "int8"), ("bfloat16", "int4")]
)
def test_more_rows_than_the_gemv_takes(tiny_model, dtype, quantization):
    """More requests than our products take rows (describe()'s cpu_kernel_rows: 4, 32 for bf16 on AVX512) decode
    in steps above that limit (bf16: oneDNN's prepacked GEMM called from C++; fp32 and int8: the wrapped module
    called back in Python), then of fewer (ours): the same bits as the per-module path throughout."""
    path = tiny_model("llama")
    options = dict(model_impl="native", dtype=dtype, quantization=quantization, cpu_kernels="fused", num_kv_blocks=128)
    with Engine(str(path), max_num_seqs=64, **options) as e:
        limit = e.describe()["cpu_kernel_rows"]
        assert limit in (4, 32)
        short = max(limit, 4)  # int4 takes every row count (limit: the other linears'); then half finish early
        lens = [2] * short + [6] * 4
        prompts = [[3 + i % 50, 5, 7 + i % 40] for i in range(len(lens))]
        params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0) for n in lens]
        model = e.model.model
        stack = model.cpu_decode
        counting = CountingStack(stack.stack)
        stack.stack = counting
        with_stack = _run(e, prompts, params)
        stack.stack = counting.inner
        e.reset_prefix_cache()
        model.cpu_decode = None
        without = _run(e, prompts, params)
        model.cpu_decode = stack
    assert max(counting.rows) == len(lens) > limit and min(counting.rows) == 4
    assert with_stack == without


@pytest.mark.parametrize("where", ["attention", "mlp"])
def test_a_hooked_module_sends_steps_through_the_modules(tiny_model, where):
    """A hook on a module the stack stands in for (the lab's trace hooks attention modules; a user may hook any)
    must see every step."""
    with Engine(str(tiny_model("llama")), model_impl="native", cpu_kernels="fused", num_kv_blocks=64) as e:
        model = e.model.model
        counting = CountingStack(model.cpu_decode.stack)
        model.cpu_decode.stack = counting
        calls = []
        module = model.layers[0].self_attn.attn if where == "attention" else model.layers[0].mlp
        handle = module.register_forward_pre_hook(lambda m, args: calls.append(1))
        try:
            counting.rows.clear()
            _run(e, PROMPTS)
        finally:
            handle.remove()
        assert counting.rows == [] and len(calls) == GREEDY.max_new_tokens  # the prefill step and 9 decode steps
