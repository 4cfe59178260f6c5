"""Our C++ CPU kernels (flab_kernels/cpu) against their torch references, per instruction set this CPU runs.

The best variant is built once into the project cache (backend/paths.py) and tested by default; the lower ones
(AVX512F without BF16, AVX2) are built and tested under `-m slow` (a minute or two each on first use).

Tolerances: fp32 products differ from F.linear by summation order only (rtol 1e-5); bf16 products are fp32 sums
of exact bf16 x bf16 products rounded once, so they are within one bf16 rounding (2^-8 relative) of the fp32
product of the same bf16 inputs, plus summation-order noise. Norms and SiLU-and-mul round where transformers
rounds: bf16 within one bf16 ulp (in practice bit-equal), fp32 within 1e-5 relative.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from backend.paths import cache_dir
from flab_kernels.activation import silu_and_mul_torch
from flab_kernels.attention_torch import paged_attention_torch
from flab_kernels.cpu import build, ops
from flab_kernels.norm import rms_norm_torch
from tests.flab_kernels.helpers import make_paged_batch

ISAS = build.supported_isas(build.cpu_flags())
pytestmark = pytest.mark.skipif(not ISAS, reason="the C++ CPU kernels need x86 with AVX2 + FMA")


def _isa_params() -> list:
    return [pytest.param(isa, marks=() if i == 0 else pytest.mark.slow) for i, isa in enumerate(ISAS)]


@pytest.fixture(params=_isa_params() or ["none"])
def ext(request):
    kernels = build.load_cpu_kernels(cache_dir().resolve(), (request.param,))
    if not kernels.available:
        pytest.fail(f"the {request.param} kernels did not load: {kernels.reason}")
    assert kernels.module.isa() == request.param
    return kernels.module


SHAPES = [(1, 16, 16), (1, 33, 17), (2, 576, 576), (3, 49, 1536), (4, 1, 5), (5, 70, 64), (9, 100, 31), (17, 40, 8)]


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = ref.abs().max().item() + 1e-6
    if dtype == torch.bfloat16:
        torch.testing.assert_close(out.float(), ref, rtol=2**-8, atol=scale * 2**-10)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=scale * 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_torch(ext, dtype, m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g) if bias else None
    packed = ops.pack_weight(w)
    assert torch.equal(ops.unpack_weight(packed, n, k), w)  # packing loses nothing
    out = ops.linear(ext, x, packed, b, n)
    assert out.shape == (m, n) and out.dtype == dtype
    _close(out, F.linear(x.float(), w.float(), b), dtype)


@pytest.mark.parametrize(
    "m,n,k", [(5, 70, 64), (8, 33, 576), (16, 40, 96), (17, 100, 32), (31, 17, 128), (40, 48, 64), (100, 20, 64)]
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_linear_of_many_rows(ext, m, n, k, bias, kind):
    """bf16 activations, more than 4 rows, on bf16 or int8 weights (AMX tiles on a variant that has them, for K a
    multiple of 32: int8 codes widened to bf16 per tile; the GEMV tiles otherwise): odd row counts (a partial group
    of 16, several groups of 32), N not a multiple of the block, a bias; within the bf16 tolerance of the fp32
    product of the same (dequantized) weights."""
    g = torch.Generator().manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g) if bias else None
    if kind == "bf16":
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        packed = ops.pack_weight(w)
        out, ref = ops.linear(ext, x, packed, b, n), F.linear(x.float(), w.float(), b)
        assert ops.linear_max_rows(ext, packed) == _bf16_rows(ext, k)
    else:
        q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        scales = torch.rand(n, generator=g) / 64
        out = ops.linear_int8(ext, x, ops.pack_int8_weight(q), scales, b, n)
        ref = F.linear(x.float(), q.float() * scales[:, None], b)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    _close(out, ref, torch.bfloat16)


def _bf16_rows(ext, k: int) -> int:
    """The row limit of a bf16 weight of K columns: 32 on AVX512 (AMX tiles for K a multiple of 32, the GEMV tiles
    elsewhere; 4 for other K where AMX runs, since oneDNN has it too), 4 on AVX2."""
    if ext.isa() == "avx2":
        return 4
    return 4 if ext.has_amx() and k % 32 else 32


def test_linear_row_limits(ext):
    """Our product's row limit, declared in C++ (tensor_ops.h): bf16 as `_bf16_rows`, fp32 4, int8 every row count
    but on AVX2 (its tiles take one row at a time)."""
    assert ext.isa() == "amx" or not ext.has_amx()
    assert ops.linear_max_rows(ext, ops.pack_weight(torch.randn(16, 64).bfloat16())) == _bf16_rows(ext, 64)
    assert ops.linear_max_rows(ext, ops.pack_weight(torch.randn(16, 40).bfloat16())) == _bf16_rows(ext, 40)
    assert ops.linear_max_rows(ext, ops.pack_weight(torch.randn(16, 64))) == 4
    int8 = ops.linear_max_rows(ext, ops.pack_int8_weight(torch.randint(-8, 8, (16, 64), dtype=torch.int8)))
    assert int8 == (4 if ext.isa() == "avx2" else ext.EVERY_ROW_COUNT)


def test_linear_keeps_leading_dims_and_takes_strided_input(ext):
    w = torch.randn(24, 40).to(torch.bfloat16)
    x = torch.randn(2, 3, 80).to(torch.bfloat16)[..., ::2]  # (2, 3, 40), not contiguous
    out = ops.linear(ext, x, ops.pack_weight(w), None, 24)
    assert out.shape == (2, 3, 24)
    _close(out, F.linear(x.float(), w.float()), torch.bfloat16)


def test_linear_fp32_input_on_bf16_weights(ext):
    """An fp32 activation against bf16 weights: multiplied in fp32, fp32 out (no rounding of x)."""
    w = torch.randn(20, 11).to(torch.bfloat16)
    x = torch.randn(3, 11)
    out = ops.linear(ext, x, ops.pack_weight(w), None, 20)
    assert out.dtype == torch.float32
    _close(out, F.linear(x, w.float()), torch.float32)


def test_linear_rejects_mismatched_shapes(ext):
    packed = ops.pack_weight(torch.randn(16, 8))
    with pytest.raises(RuntimeError, match="x must be"):
        ext.linear(torch.randn(2, 9), packed, None, 16, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("rows,hidden", [(1, 64), (3, 577), (8, 2048)])
def test_rms_norm_matches_torch(ext, dtype, offset, rows, hidden):
    g = torch.Generator().manual_seed(rows + hidden)
    x, r = (torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(2))
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    ulp = 2**-7 if dtype == torch.bfloat16 else 1e-5
    out = ops.rms_norm(ext, x, w, 1e-6, offset=offset)
    torch.testing.assert_close(out, rms_norm_torch(x, w, 1e-6, offset=offset), rtol=ulp, atol=ulp)
    out, res = ops.rms_norm(ext, x, w, 1e-6, r, offset)
    ref, ref_res = rms_norm_torch(x, w, 1e-6, r, offset)
    assert torch.equal(res, ref_res)  # the residual sum is one rounding of x + r, as torch's
    torch.testing.assert_close(out, ref, rtol=ulp, atol=ulp)


def test_rms_norm_on_head_shaped_input(ext):
    """Qwen3's q/k norms: (T, heads, head_dim), normalised over head_dim."""
    x = torch.randn(5, 3, 32).to(torch.bfloat16)
    w = torch.rand(32).to(torch.bfloat16)
    torch.testing.assert_close(ops.rms_norm(ext, x, w, 1e-6), rms_norm_torch(x, w, 1e-6), rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,inter", [(1, 1), (4, 777), (9, 1536)])
def test_silu_and_mul_matches_torch(ext, dtype, rows, inter):
    x = (3 * torch.randn(rows, 2 * inter)).to(dtype)
    ulp = 2**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(ops.silu_and_mul(ext, x), silu_and_mul_torch(x), rtol=ulp, atol=ulp)


def test_no_compiler_means_the_torch_path_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    kernels = build.load_cpu_kernels(tmp_path, tuple(ISAS))
    assert not kernels.available and "no C++ compiler" in kernels.reason


def test_a_failed_build_means_the_torch_path_with_a_reason(tmp_path, monkeypatch):
    """A variant whose compiler flags the compiler rejects: a real failed build, reported, nothing raised."""
    isa = ISAS[-1]
    monkeypatch.setitem(build.VARIANTS, isa, (build.VARIANTS[isa][0], ("-mno-such-instruction-set",)))
    kernels = build.load_cpu_kernels(tmp_path, (isa,))
    assert not kernels.available
    assert kernels.reason.startswith("the C++ CPU kernels did not build") and isa in kernels.reason


def test_no_supported_instruction_set():
    kernels = build.load_cpu_kernels(cache_dir().resolve(), ())
    assert not kernels.available and "instruction set" in kernels.reason
    assert build.supported_isas(None) == []
    assert build.supported_isas({"sse2"}) == []


DECODE_CASES = [  # (cached lens, Hq, Hkv, D, block size): GQA ratios, block boundaries, odd head sizes
    ([0, 15, 16, 17], 4, 4, 16, 16),
    ([31, 3, 64], 8, 2, 64, 16),
    ([100], 12, 1, 32, 8),
    ([7, 200, 33, 1], 6, 3, 24, 32),
    ([47], 9, 3, 80, 16),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cached,hq,hkv,d,bs", DECODE_CASES)
@pytest.mark.parametrize(
    "softcap,window,with_sinks", [(None, None, False), (30.0, None, False), (None, 5, False), (None, None, True)]
)
def test_paged_decode_matches_torch(ext, dtype, cached, hq, hkv, d, bs, softcap, window, with_sinks):
    """In place over shuffled blocks; tolerance: fp32 1e-5, bf16 one bf16 rounding of the output (2^-7) plus the
    reference's own bf16 math (SDPA in bf16)."""
    batch = make_paged_batch([1] * len(cached), cached, hq, hkv, d, bs, dtype, seed=sum(cached) + hq)
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(1)) if with_sinks else None
    scale = d**-0.5
    out = ops.paged_decode(
        ext, batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, scale, softcap, window, sinks
    )
    ref = paged_attention_torch(*batch.args(), scale, softcap, window, sinks)
    assert out.shape == ref.shape and out.dtype == dtype
    tol = 2**-6 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


LONG_CASES = [  # fewer (sequence, KV head) items than two per thread: each context split into chunks of blocks
    ([1100], 9, 3, 64, 16),
    ([700, 30], 4, 1, 128, 16),
    ([999], 2, 2, 40, 8),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cached,hq,hkv,d,bs", LONG_CASES)
@pytest.mark.parametrize(
    "softcap,window,with_sinks", [(None, None, False), (30.0, None, False), (None, 600, False), (None, None, True)]
)
def test_paged_decode_splits_long_contexts_across_threads(
    ext, dtype, cached, hq, hkv, d, bs, softcap, window, with_sinks
):
    """Two threads: the long contexts are split into chunks computed apart and merged; the same tolerance against
    the torch reference as unsplit, and within fp32 summation order of one thread's unsplit result."""
    batch = make_paged_batch([1] * len(cached), cached, hq, hkv, d, bs, dtype, seed=sum(cached) + d)
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(2)) if with_sinks else None
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, d**-0.5, softcap, window, sinks)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        split = ops.paged_decode(ext, *args)
        torch.set_num_threads(1)
        whole = ops.paged_decode(ext, *args)
    finally:
        torch.set_num_threads(threads)
    ref = paged_attention_torch(*batch.args(), d**-0.5, softcap, window, sinks)
    tol = 2**-6 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(split, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(split, whole, rtol=tol, atol=tol)


def test_paged_decode_rejects_a_length_outside_its_table(ext):
    batch = make_paged_batch([1], [15], 2, 2, 16, 16, torch.float32)
    with pytest.raises(RuntimeError, match="outside its block table"):
        ops.paged_decode(ext, batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens + 64, 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_int8_matches_torch(ext, dtype, m, n, k, bias):
    """Weight-only int8 with per-row scales against the fp32 product of the dequantized weight (the torch kernel
    `_weight_int8pack_mm` computes the same in the activation dtype)."""
    g = torch.Generator().manual_seed(m + n * k)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, generator=g) / 64
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g) if bias else None
    out = ops.linear_int8(ext, x, ops.pack_int8_weight(q), scales, b, n)
    assert out.shape == (m, n) and out.dtype == dtype
    _close(out, F.linear(x.float(), q.float() * scales[:, None], b), dtype)


INT4_CASES = [  # (M, N, K, group): odd N, K not a whole number of groups, groups of 2..128, 1-70 rows
    (1, 16, 32, 32),
    (1, 33, 70, 32),
    (2, 576, 576, 64),
    (3, 49, 256, 128),
    (4, 5, 2, 2),
    (9, 70, 100, 8),
    (12, 40, 64, 8),  # AMX (K a multiple of 32, 8+ rows): several groups in one tile
    (20, 17, 96, 16),
    (70, 33, 128, 32),  # three groups of 32 rows
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,n,k,group", INT4_CASES)
@pytest.mark.parametrize("with_zeros,bias", [(False, False), (True, True)])
def test_linear_int4_matches_torch(ext, dtype, m, n, k, group, with_zeros, bias):
    """int4 group-wise (w = (code - 8 - zero) * scale, as flab_kernels.quant_torch) against the fp32 product of the
    dequantized weight; up to 4 rows the same tolerance as the 16-bit products (one output rounding plus summation
    order), above in bf16 `_int4_bound`."""
    g = torch.Generator().manual_seed(m + n * k + group)
    groups = -(-k // group)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, groups, generator=g) / 16
    zeros = torch.randint(-8, 8, (n, groups), generator=g).float() if with_zeros else torch.zeros(n, groups)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g) if bias else None
    cols = torch.arange(k) // group
    w = (codes.float() - 8 - zeros[:, cols]) * scales[:, cols]  # (N, K)
    packed = ops.pack_int4_weight(codes, scales, -(8 + zeros) * scales, group)
    out = ops.linear_int4(ext, x, packed, b, n)
    assert out.shape == (m, n) and out.dtype == dtype
    if dtype == torch.bfloat16 and m > 4:  # many rows: w rounded to bf16 for the bf16 dot product
        _int4_bound(out, F.linear(x.float(), w, b), x, w)
    else:
        _close(out, F.linear(x.float(), w, b), dtype)


# the group-wise tile below 8 rows (AMX) or 32; the weight dequantized per pair of blocks into AMX tiles from 8 rows
# (K a multiple of 32), else dequantized once for torch's GEMM from 32
INT4_ROWS = [1, 2, 4, 5, 8, 13, 32, 64]
INT4_SHAPES = [(33, 70, 32), (49, 200, 64), (96, 256, 128), (16, 576, 64)]  # (N, K, group): odd N, K partial groups


def _int4_centered(n: int, k: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) codes 0..15 and (N, G) bf16 scale / offset pairs of w = (code - 8) * scale + offset (cpu_int4pack's)."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) / 16).to(torch.bfloat16)
    offsets = (torch.randn(n, groups, generator=g) / 8).to(torch.bfloat16)
    return codes, scales, offsets


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k,group", INT4_SHAPES)
def test_int4_bf16_scales_equal_the_fp32_packing_bit_for_bit(ext, dtype, n, k, group):
    """bf16 scale / offset pairs (the code bias 8 applied in the kernel) give the bits of the fp32 packing of
    offsets - 8 * scales computed in fp32 by torch, for every row count (both kernels)."""
    codes, scales, offsets = _int4_centered(n, k, group, n + k)
    centered = ops.pack_int4_weight(codes, scales, offsets, group, centered=True)
    assert centered.scales.dtype == torch.bfloat16 and centered.centered
    fp32 = ops.pack_int4_weight(codes, scales.float(), offsets.float() - 8 * scales.float(), group)
    b = torch.randn(n, generator=torch.Generator().manual_seed(1))
    for m in INT4_ROWS:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        assert torch.equal(ops.linear_int4(ext, x, centered, b, n), ops.linear_int4(ext, x, fp32, b, n)), m
    torch.testing.assert_close(centered.dequantize(n, k), fp32.dequantize(n, k), rtol=0, atol=0)


def _int4_bound(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """bf16: |out - ref| <= 2^-8 |ref| + 2^-8 (|x| @ |w|.T): one output rounding each (2^-9) and, where one side
    rounds the dequantized weight to bf16 (2^-9 of each |x w| term) and the other does not, that rounding."""
    bound = 2**-8 * ref.abs() + 2**-8 * (x.float().abs() @ w.abs().t())
    excess = (out.float() - ref).abs() - bound
    assert excess.max().item() <= 0, f"off by {excess.max().item()} beyond the bound"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k,group", INT4_SHAPES)
@pytest.mark.parametrize("centered", [False, True])
def test_linear_int4_rows_match_the_fp32_product(ext, dtype, n, k, group, centered):
    """1..64 rows, both scale storages, against the fp32 product of the dequantized weight: fp32 within 1e-5
    (summation order, one rounding of w); bf16 within `_int4_bound` (many rows with bf16 x on the bf16 dot product
    round w to bf16)."""
    codes, scales, offsets = _int4_centered(n, k, group, 3 * n + k)
    if centered:
        packed = ops.pack_int4_weight(codes, scales, offsets, group, centered=True)
    else:
        packed = ops.pack_int4_weight(codes, scales.float(), offsets.float() - 8 * scales.float(), group)
    w = packed.dequantize(n, k)  # (N, K) fp32
    b = torch.randn(n, generator=torch.Generator().manual_seed(2))
    for m in INT4_ROWS:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(7 * m)).to(dtype)
        out = ops.linear_int4(ext, x, packed, b, n)
        assert out.shape == (m, n) and out.dtype == dtype
        ref = F.linear(x.float(), w, b)
        if dtype == torch.float32:
            _close(out, ref, dtype)
        else:
            _int4_bound(out, ref, x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 4, 6, 16, 33, 64])
def test_linear_int4_matches_torchs_int4pack_kernel(ext, dtype, group, m):
    """Against torch's own `_weight_int4pack_mm_for_cpu` on the same codes and bf16 / fp32 pairs (what the quantized
    module runs): fp32 within 1e-5, bf16 within `_int4_bound`."""
    from flab_kernels.quant_torch import int4pack_weight

    n, k = 48, 2 * group + 256
    codes, scales, offsets = _int4_centered(n, k, group, m + group)
    pairs = torch.stack((scales, offsets), dim=-1).transpose(0, 1).contiguous().to(dtype)  # (G, N, 2)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    ref = torch._weight_int4pack_mm_for_cpu(x, int4pack_weight(codes.int() - 8), group, pairs).float()
    s, o = pairs[..., 0].t(), pairs[..., 1].t()
    if dtype == torch.bfloat16:
        packed = ops.pack_int4_weight(codes, s, o, group, centered=True)
    else:
        packed = ops.pack_int4_weight(codes, s, o - 8 * s, group)
    out = ops.linear_int4(ext, x, packed, None, n)
    if dtype == torch.float32:
        _close(out, ref, dtype)
    else:
        _int4_bound(out, ref, x, packed.dequantize(n, k))


def test_int4_packing_rejects_odd_groups_and_bad_scales():
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="even group size"):
        ops.pack_int4_weight(codes, torch.ones(4, 3), torch.zeros(4, 3), 3)
    with pytest.raises(ValueError, match="scales and offsets"):
        ops.pack_int4_weight(codes, torch.ones(4, 1), torch.zeros(4, 1), 4)
    with pytest.raises(TypeError, match="bf16"):
        ops.pack_int4_weight(codes, torch.ones(4, 2), torch.zeros(4, 2), 4, centered=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_and_mul_over_the_whole_range(ext, dtype):
    """The vectorized exp at its clamps (|x| up to 200: silu -> 0 or x), tails of odd widths, inf and NaN."""
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(5, 2 * 203, generator=g) * 400 - 200).to(dtype)
    x[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])
    out, ref = ops.silu_and_mul(ext, x), silu_and_mul_torch(x)
    ulp = 2**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out[:, 4:], ref[:, 4:], rtol=ulp, atol=ulp)
    assert out[0, 2].isnan() and out[0, 3] == 0  # NaN stays NaN; silu(0) * u = 0


def test_the_isa_cap_picks_lower_variants(monkeypatch):
    order = list(build.VARIANTS)
    assert build.capped_isas(order, None) == order
    assert build.capped_isas(order, "avx2") == ["avx2"]
    assert build.capped_isas(order, "avx512") == ["avx512", "avx2"]
    with pytest.raises(ValueError, match="FLAB_CPU_ISA"):
        build.capped_isas(order, "sse9")
    monkeypatch.setenv(build.ISA_ENV, "sse9")
    kernels = build.cpu_kernels(cache_dir())
    assert not kernels.available and "FLAB_CPU_ISA='sse9'" in kernels.reason


@pytest.mark.slow
@pytest.mark.skipif("avx2" not in ISAS, reason="no AVX2 on this CPU")
def test_the_isa_cap_loads_the_avx2_kernels(monkeypatch):
    monkeypatch.setenv(build.ISA_ENV, "avx2")
    kernels = build.cpu_kernels(cache_dir())
    assert kernels.available and kernels.isa == "avx2" and kernels.module.isa() == "avx2"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,hq,hkv,d,rd", [(1, 9, 3, 64, 64), (5, 4, 4, 16, 8), (3, 2, 1, 80, 40)])
def test_rope_matches_torch_bit_for_bit(ext, dtype, t, hq, hkv, d, rd):
    """In place over the q | k columns of a (T, (Hq + 2 Hkv) * D) projection output (rows strided), partial rotary
    dims included; the same roundings as backend/layers/rotary.py's torch math, so equal bit for bit."""
    from backend.layers.rotary import _rotate, rope_step

    g = torch.Generator().manual_seed(t * d + rd)
    inv = 1.0 / (10000.0 ** (torch.arange(0, rd, 2).float() / rd))
    angles = torch.arange(512).float()[:, None] * inv[None]  # (P, rd/2)
    cache = torch.cat([angles.cos(), angles.sin()], -1)  # (P, rd) [cos | sin]
    rope = rope_step(torch.randint(0, 512, (t,), generator=g), cache, dtype)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    qk = qkv[:, : (hq + hkv) * d]
    ref = _rotate(qk.reshape(t, hq + hkv, d), rope).view(t, -1)
    v_before = qkv[:, (hq + hkv) * d :].clone()
    ops.rope_(ext, qk, rope.cos, rope.sin, hq + hkv, d)
    assert torch.equal(qk, ref)
    assert torch.equal(qkv[:, (hq + hkv) * d :], v_before)  # the v columns untouched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_kv_matches_torch(ext, dtype):
    from flab_kernels.attention_torch import store_kv_torch

    g = torch.Generator().manual_seed(0)
    t, hkv, d, nb, bs = 5, 3, 24, 6, 4
    kv = torch.randn(t, 3 * hkv * d, generator=g).to(dtype)  # k and v as strided column ranges of one output
    k, v = kv[:, hkv * d : 2 * hkv * d], kv[:, 2 * hkv * d :]
    slots = torch.tensor([0, 23, 5, 4, 17])
    caches = [torch.zeros(nb, bs, hkv, d, dtype=dtype) for _ in range(4)]
    ops.store_kv(ext, k, v, caches[0], caches[1], slots)
    store_kv_torch(k.reshape(t, hkv, d), v.reshape(t, hkv, d), caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    with pytest.raises(RuntimeError, match="slot outside the cache"):
        ops.store_kv(ext, k, v, caches[0], caches[1], slots + 100)


def test_products_shared_by_claimed_chunks_equal_one_thread(ext):
    """The products split into chunks that this thread and helpers claim (csrc/claim.h): every output written once,
    bit for bit what one thread computes, over many calls of varying sizes (helpers asleep or spinning)."""
    g = torch.Generator().manual_seed(7)
    cases = [(torch.randn(n, 576, generator=g).bfloat16(), n) for n in (64, 576, 1728, 3000)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        x = torch.randn(1, 576, generator=g).bfloat16()
        ref = [ops.linear(ext, x, ops.pack_weight(w), None, n) for w, n in cases]
        torch.set_num_threads(max(2, threads))
        for _ in range(50):
            for (w, n), r in zip(cases, ref):
                assert torch.equal(ops.linear(ext, x, ops.pack_weight(w), None, n), r)
    finally:
        torch.set_num_threads(threads)


def _product_in_child(queue) -> None:  # runs in a forked child: the parent's helper threads are not there
    torch.set_num_threads(1)  # torch's own ops stay off OpenMP here (libgomp regions hang after a fork)
    ext = build.cpu_kernels(cache_dir()).module
    packed, x = ops.pack_weight(torch.ones(256, 512).bfloat16()), torch.ones(1, 512).bfloat16()
    torch.set_num_threads(2)  # only our kernel's chunks see 2 threads
    out = ops.linear(ext, x, packed, None, 256)
    torch.set_num_threads(1)
    queue.put(out.float().sum().item())


CLAIM_POOL = os.environ.get("FLAB_CPU_POOL") == "claim"  # csrc/claim.cpp: the pool is chosen once per process


@pytest.mark.skipif(not CLAIM_POOL, reason="the claim pool's rule (OpenMP, the default, hangs after a fork as torch's")
def test_a_forked_child_computes_without_the_parents_helpers(ext):
    """After a fork the helper threads are gone: the caller claims every chunk itself (no wait, no deadlock)."""
    import multiprocessing

    torch.set_num_threads(max(2, torch.get_num_threads()))
    ops.linear(ext, torch.ones(1, 512).bfloat16(), ops.pack_weight(torch.ones(256, 512).bfloat16()), None, 256)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_product_in_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == 256 * 512


def test_the_claim_pool_in_a_process_of_its_own(ext):
    """FLAB_CPU_POOL=claim (the helpers that never wait at a barrier): the chunk tests above in a process that runs
    that pool (the default is OpenMP's, torch's own)."""
    if CLAIM_POOL:
        pytest.skip("this process runs the claim pool already")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "claimed_chunks or forked"],
        env={**os.environ, "FLAB_CPU_POOL": "claim"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0 and "2 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
