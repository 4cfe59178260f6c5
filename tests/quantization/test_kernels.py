"""Triton dequantize-in-kernel matmul against the torch reference (TRITON_INTERPRET=1 on CPU, see tests/conftest.py).

fp16 and fp32 only on CPU: triton 3.9's interpreter computes tl.dot wrongly for bf16 (bf16 is tested on GPUs).
"""

from __future__ import annotations

import pytest
import torch

from backend.quantization import resolve_quantization
from backend.tools.export_quantized import linear_tensors
from flab_kernels._triton import HAS_TRITON
from flab_kernels.quant_torch import pack_int4_nibbles, quant_matmul_torch
from tests.quantization.common import REL_TOL, build, load, rel_err

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def random_weight(mode: str, n: int, k: int) -> torch.Tensor:
    if mode == "int8":
        return torch.randint(-128, 128, (n, k), dtype=torch.int8)
    if mode == "int4":
        return pack_int4_nibbles(torch.randint(-8, 8, (n, k)))
    return (torch.randn(n, k) * 20).to(torch.float8_e4m3fn).view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "mode,zeros,m,n,k,group",
    [
        ("int8", False, 1, 48, 64, 64),  # per channel, decode-sized M
        ("int8", True, 17, 80, 96, 32),
        ("int4", True, 5, 64, 128, 32),
        ("int4", False, 3, 40, 66, 66),  # odd number of nibble pairs, one group
        ("fp8", False, 9, 72, 128, 64),  # block-wise fp8 scales
    ],
)
def test_quant_matmul_matches_reference(dtype, mode, zeros, m, n, k, group):
    from flab_kernels.quant_matmul import quant_matmul_triton

    torch.manual_seed(0)
    g = -(-k // group)
    q = random_weight(mode, n, k).to(DEVICE)
    scales = (torch.rand(n, g) * 0.02 + 0.001).to(DEVICE, dtype)
    z = torch.randint(-4, 4, (n, g)).to(DEVICE, dtype) if zeros else None
    bias = torch.randn(n).to(DEVICE, dtype)
    x = torch.randn(m, k).to(DEVICE, dtype)
    y = quant_matmul_triton(x, q, scales, z, group, mode, bias)
    ref = quant_matmul_torch(x.float(), q, scales, z, group, mode, bias.float())
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) < REL_TOL[dtype]


def test_fp8_decoder_covers_every_code():
    """Every finite e4m3fn code (incl. subnormals and negatives) decodes exactly: x = identity reads W back."""
    from flab_kernels.quant_matmul import quant_matmul_triton

    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)  # drop the two NaN codes
    w = codes[:, None].expand(-1, 16).contiguous().to(DEVICE)  # (254, 16)
    scales = torch.ones(w.shape[0], 1, device=DEVICE)
    x = torch.eye(16, device=DEVICE)
    y = quant_matmul_triton(x, w, scales, None, 16, "fp8")  # (16, 254) = W.T
    assert torch.equal(y.t().cpu(), codes.view(torch.float8_e4m3fn).float()[:, None].expand(-1, 16))


def test_fp8_table_decodes_every_code_like_torch():
    """The CPU table lookup of fp8_bits_to_float gives torch's own conversion for all 256 codes (NaN too), in
    any shape: (N, K) bits -> (N, K) float32."""
    from flab_kernels.quant_torch import fp8_bits_to_float

    bits = torch.randperm(256).to(torch.uint8).repeat(3, 2)  # (3, 512): every code, shuffled, twice per row
    got, want = fp8_bits_to_float(bits), bits.view(torch.float8_e4m3fn).float()
    assert got.shape == bits.shape and got.dtype == torch.float32
    assert torch.equal(got.isnan(), want.isnan()) and int(want.isnan().sum()) == 12
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("request_", ["int8", "int4:g32", "fp8"])
def test_on_the_fly_modules_on_triton(dtype, request_):
    method = resolve_quantization(f"{request_}{',' if ':' in request_ else ':'}kernel=triton", {})
    m = load(
        build(method, 128, 48, bias=True),
        {"weight": torch.randn(48, 128) * 0.1, "bias": torch.randn(48)},
        dtype,
        DEVICE,
    )
    assert m.kernel == "triton"
    x = torch.randn(3, 128, dtype=dtype, device=DEVICE)
    ref = x.float() @ m.dequantize().t() + m.bias.float()
    assert rel_err(m(x), ref) < REL_TOL[dtype]


def test_gptq_act_order_on_triton():
    torch.manual_seed(0)
    perm = torch.randperm(128)
    tensors = linear_tensors("gptq", torch.randn(64, 128) * 0.1, 4, 32, False, "gptq", act_order=perm)
    method = resolve_quantization(
        None,
        {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": True}},
    )
    method.set_kernel("triton")
    m = load(build(method, 128, 64), tensors, torch.float16, DEVICE)
    assert m.kernel == "triton" and m.w_perm is not None
    x = torch.randn(5, 128, dtype=torch.float16, device=DEVICE)
    assert rel_err(m(x), x.float() @ m.dequantize().t()) < REL_TOL[torch.float16]
