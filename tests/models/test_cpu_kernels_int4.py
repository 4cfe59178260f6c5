"""int4 group-wise linears on our C++ kernels: the repacking from both layouts the quantization layer keeps (its torch
nibbles and torch's opaque `cpu_int4pack`, whose bf16 scale / offset pairs stay bf16), the kernel's product against
the module's own at every row count (few rows: the group-wise tile; many: dequantized once, torch's GEMM), and
engine tokens."""

from __future__ import annotations

import pytest
import torch

from backend import Engine, SamplingParams
from backend.layers.cpu.fused import FusedInt4Product, FusedLinear, _int4_groups
from backend.paths import cache_dir
from backend.quantization import resolve_quantization
from flab_kernels.cpu import build as cpu_build
from flab_kernels.cpu import ops
from tests.quantization.common import build, load

ISAS = cpu_build.supported_isas(cpu_build.cpu_flags())
pytestmark = pytest.mark.skipif(not ISAS, reason="the C++ CPU kernels need x86 with AVX2 + FMA")


@pytest.fixture(scope="module")
def ext():
    kernels = cpu_build.cpu_kernels(cache_dir())
    if not kernels.available:
        pytest.fail(f"the kernels did not load: {kernels.reason}")
    return kernels.module


def _module(dtype: torch.dtype, spec: str, n: int = 64, k: int = 256):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05
    return load(build(resolve_quantization(spec, {}), k, n, bias=True), {"weight": w, "bias": torch.randn(n)}, dtype)


def _dequant(packed, n: int, k: int) -> torch.Tensor:  # our packing back to (N, K) fp32
    return packed.dequantize(n, k)


@pytest.mark.parametrize(
    "dtype,spec,kernel",
    [
        (torch.float32, "int4:g64", "torch"),
        (torch.bfloat16, "int4:g64,kernel=torch", "torch"),
        (torch.bfloat16, "int4:g32", "cpu_int4pack"),
        (torch.bfloat16, "int4:g128", "cpu_int4pack"),
    ],
)
def test_repacked_weight_is_the_modules_weight(ext, dtype, spec, kernel):
    """Our packing dequantizes to the module's own weight (fp32: exactly up to the order of the two products;
    cpu_int4pack: the codes recovered from its bf16 read-back are exact, so within one bf16 rounding of w)."""
    m = _module(dtype, spec)
    assert m.kernel == kernel
    packed = _int4_groups(m)
    assert packed is not None
    ref = m.dequantize()
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(_dequant(packed, 64, 256), ref, rtol=tol, atol=tol * ref.abs().max().item())
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(5)).to(dtype)
    out = FusedInt4Product(ext, packed, 64, 256, m.bias)(x)
    ref_out = torch.nn.functional.linear(x.float(), ref, m.bias.float())
    scale = ref_out.abs().max().item()
    torch.testing.assert_close(out.float(), ref_out, rtol=2**-7, atol=scale * 2**-8)


def test_other_linears_are_not_int4_groups():
    assert _int4_groups(_module(torch.float32, "int8")) is None
    assert _int4_groups(torch.nn.Linear(4, 4)) is None


def test_bf16_int4pack_pairs_stay_bf16_and_give_the_fp32_packings_bits(ext):
    """From a bf16 `cpu_int4pack` module the scale / offset pairs are kept as they are (half the bytes of fp32) and
    the products are bit for bit those of the fp32 packing of offsets - 8 * scales (the packing before)."""
    m = _module(torch.bfloat16, "int4:g64")
    assert m.kernel == "cpu_int4pack"
    packed = _int4_groups(m)
    assert packed.centered and packed.scales.dtype == packed.offsets.dtype == torch.bfloat16
    s = packed.scales.float()
    fp32 = ops.Int4Packed(packed.codes, s, packed.offsets.float() - 8 * s, packed.group_size)
    assert packed.scales.nbytes + packed.offsets.nbytes == (fp32.scales.nbytes + fp32.offsets.nbytes) // 2
    for rows in (1, 4, 7, 40):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        ours = FusedInt4Product(ext, packed, 64, 256, m.bias)(x)
        assert torch.equal(ours, FusedInt4Product(ext, fp32, 64, 256, m.bias)(x)), rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 16, 33, 100])
def test_every_row_count_runs_ours_close_to_the_modules_product(ext, dtype, rows):
    """FusedLinear runs our kernel for any row count (prefill included), against the module's own product (bf16:
    torch's `_weight_int4pack_mm_for_cpu`; fp32: the `torch` kernel's dequantize-and-multiply): fp32 within 1e-5;
    bf16 within one output rounding each plus, where ours rounds the dequantized weight to bf16 (many rows), that
    rounding: 2^-8 of |ref| + 2^-8 of sum |x w|."""
    m = _module(dtype, "int4:g64")
    assert m.kernel == ("cpu_int4pack" if dtype == torch.bfloat16 else "torch")
    lin = FusedLinear(m, FusedInt4Product(ext, _int4_groups(m), 64, 256, m.bias))
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
    out = lin(x)
    calls = []
    lin.inner.register_forward_hook(lambda *a: calls.append(1))
    lin(x)
    assert not calls, "the module's own product ran"
    ref = m(x).float()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:
        w = m.dequantize()
        bound = 2**-8 * ref.abs() + 2**-8 * (x.float().abs() @ w.abs().t()) + 2**-8 * m.bias.float().abs()
        assert ((out.float() - ref).abs() <= bound).all()


PROMPTS = [list(range(1, 60)), [7, 8, 9] * 3, [11]]  # a prefill of 59 rows (dequantized weights), short ones
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)


def _tokens(path, **options) -> tuple[list[list[int]], dict]:
    with Engine(str(path), num_kv_blocks=64, model_impl="native", quantization="int4", **options) as engine:
        outs = engine.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
        return [o.token_ids for o in outs], engine.describe()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_tokens_with_int4_prefill_on_our_kernel(tiny_model, dtype):
    """Greedy tokens with the int4 products of prefill and decode on our kernels against the torch path: fp32 the
    same tokens; bf16 the first 6 of every prompt (the tiny random model's next-token distribution is nearly flat,
    and the two paths round the dequantized weight differently: they part at a near-tie after ~8 tokens)."""
    path = tiny_model("llama")
    fused, info = _tokens(path, cpu_kernels="fused", dtype=dtype)
    plain, _ = _tokens(path, cpu_kernels="torch", dtype=dtype)
    assert info["cpu_kernels"] == "fused" and info["swapped"]["FusedLinear (C++ GEMV for decode rows)"] > 0
    if dtype == "float32":
        assert fused == plain
    else:
        assert [t[:6] for t in fused] == [t[:6] for t in plain]
