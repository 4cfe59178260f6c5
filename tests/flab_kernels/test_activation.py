"""Gated activations: torch reference against HF's MLP math, Triton against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flab_kernels.activation import (
    gelu_and_mul_torch,
    gelu_and_mul_triton,
    silu_and_mul_torch,
    silu_and_mul_triton,
)


def test_torch_reference_is_hf_mlp():
    gate, up = torch.randn(3, 40).half(), torch.randn(3, 40).half()
    x = torch.cat([gate, up], -1)
    assert torch.equal(silu_and_mul_torch(x), F.silu(gate) * up)  # LlamaMLP: act_fn(gate) * up
    assert torch.equal(gelu_and_mul_torch(x, "tanh"), F.gelu(gate, approximate="tanh") * up)  # gelu_pytorch_tanh


# Activation computed in fp32 then rounded like torch's: fp32 differs by exp/erf implementations
# (1e-6), fp16 by at most one ulp of the activation then one of the product (|y| < 16 -> 2e-2 abs worst).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=2e-3)}


@pytest.mark.usefixtures("kernel_device")  # CUDA where there is a GPU (conftest.py)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inter", [24, 1500])  # 1500: several column blocks and a masked tail
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_triton_matches_reference(dtype, inter, act):
    x = (torch.randn(2, 2, 2 * inter) * 3).to(dtype)
    if act == "silu":
        ref, out = silu_and_mul_torch(x), silu_and_mul_triton(x)
    else:
        approx = "tanh" if act == "gelu_tanh" else "none"
        ref, out = gelu_and_mul_torch(x, approx), gelu_and_mul_triton(x, approx)
    assert out.shape == (2, 2, inter) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.usefixtures("kernel_device")  # CUDA where there is a GPU (conftest.py)
def test_bad_arguments():
    with pytest.raises(ValueError, match="approximate"):
        gelu_and_mul_triton(torch.randn(2, 8), "erf")
    with pytest.raises(ValueError, match="even"):
        silu_and_mul_triton(torch.randn(2, 7))
