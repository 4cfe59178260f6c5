"""RMSNorm: torch reference against HF's modules, Triton against the reference."""

from __future__ import annotations

import pytest
import torch

from flab_kernels.norm import rms_norm_torch, rms_norm_triton


def _hf_llama_rms(x, weight, eps):  # transformers' LlamaRMSNorm.forward, verbatim
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def _hf_gemma_rms(x, weight, eps):  # transformers' GemmaRMSNorm.forward, verbatim
    out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + weight.float())
    return out.type_as(x)


DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_reference_is_hf(dtype):
    x = torch.randn(3, 5, 48).to(dtype)
    w = torch.randn(48).to(dtype)
    assert torch.equal(rms_norm_torch(x, w, 1e-6), _hf_llama_rms(x, w, 1e-6))
    assert torch.equal(rms_norm_torch(x, w, 1e-6, offset=1.0), _hf_gemma_rms(x, w, 1e-6))
    r = torch.randn_like(x)
    out, new_r = rms_norm_torch(x, w, 1e-6, residual=r)
    assert torch.equal(new_r, r + x) and torch.equal(out, _hf_llama_rms(r + x, w, 1e-6))


# The kernel reproduces the reference's roundings; only rsqrt vs 1/sqrt and the reduction order
# differ (a few fp32 ulps before the final rounding): fp32 1e-5, fp16 one fp16 ulp at |y| < 8.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=1e-3)}


@pytest.mark.usefixtures("kernel_device")  # CUDA where there is a GPU (conftest.py)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [48, 256])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_matches_reference(dtype, hidden, offset, with_residual):
    x = torch.randn(2, 3, hidden).to(dtype)
    w = (torch.randn(hidden) * 0.5 + 1).to(dtype)
    r = torch.randn_like(x) if with_residual else None
    ref = rms_norm_torch(x, w, 1e-5, r, offset)
    out = rms_norm_triton(x, w, 1e-5, r, offset)
    if with_residual:
        assert torch.equal(out[1], ref[1])  # the residual sum is rounded exactly like torch's add
        ref, out = ref[0], out[0]
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
