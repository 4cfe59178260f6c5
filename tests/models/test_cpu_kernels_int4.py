"""int4 group-wise linears on our C++ GEMV: the repacking from both layouts the quantization layer keeps (its torch
nibbles and torch's opaque `cpu_int4pack`), the kernel's product against the module's own, and engine tokens."""

from __future__ import annotations

import pytest
import torch

from backend.layers.cpu.fused import FusedInt4Product, _int4_groups
from backend.paths import cache_dir
from backend.quantization import resolve_quantization
from flab_kernels.cpu import build as cpu_build
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
    nb, kp, _ = packed.codes.shape
    c = packed.codes.permute(0, 2, 1).reshape(nb * 16, kp)
    codes = torch.stack((c & 0xF, c >> 4), dim=-1).flatten(-2)[:n, :k].float()
    cols = torch.arange(k) // packed.group_size
    scales = packed.scales.permute(0, 2, 1).reshape(nb * 16, -1)[:n]
    offsets = packed.offsets.permute(0, 2, 1).reshape(nb * 16, -1)[:n]
    return codes * scales[:, cols] + offsets[:, cols]


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
