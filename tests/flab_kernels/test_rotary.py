"""Rotary: torch reference against transformers' own functions (fp32), Triton against the reference."""

from __future__ import annotations

import pytest
import torch

from flab_kernels.rotary import (
    apply_rotary_torch,
    apply_rotary_triton,
    cos_sin_cache_from_inv_freq,
    rope_inv_freq,
)


def _inputs(t, hq, hkv, d, dtype, seed=0):  # generated on the CPU, returned on the test's device
    device = torch.get_default_device()
    with torch.device("cpu"):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(t, hq, d, generator=g).to(dtype)
        k = torch.randn(t, hkv, d, generator=g).to(dtype)
        positions = torch.randint(0, 200, (t,), generator=g)
    return q.to(device), k.to(device), positions.to(device)


@pytest.mark.parametrize("rotary_dim", [32, 16])  # 16 of 32: partial rotary (phi / gpt-neox style)
def test_neox_reference_is_hf_llama(rotary_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, positions = _inputs(6, 4, 2, 32, torch.float32)
    inv_freq = rope_inv_freq(rotary_dim, 10000.0)
    cache = cos_sin_cache_from_inv_freq(inv_freq, 256)
    freqs = positions[:, None].float() * inv_freq  # as LlamaRotaryEmbedding: emb = cat(freqs, freqs)
    emb = torch.cat([freqs, freqs], -1)[None]  # (1, T, rd)
    hq, hk = apply_rotary_pos_emb(
        q[..., :rotary_dim].transpose(0, 1)[None], k[..., :rotary_dim].transpose(0, 1)[None], emb.cos(), emb.sin()
    )  # (1, H, T, rd)
    oq, ok = apply_rotary_torch(q, k, positions, cache, is_neox=True)
    torch.testing.assert_close(oq[..., :rotary_dim], hq[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ok[..., :rotary_dim], hk[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    assert torch.equal(oq[..., rotary_dim:], q[..., rotary_dim:])


def test_gptj_reference_is_hf_gptj():
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

    rotary_dim = 8
    q, k, positions = _inputs(5, 2, 2, 16, torch.float32, seed=1)
    sincos = create_sinusoidal_positions(256, rotary_dim)[positions][None]  # (1, T, rd) = [sin | cos]
    sin, cos = torch.split(sincos, rotary_dim // 2, dim=-1)
    hq = apply_rotary_pos_emb(q[None, :, :, :rotary_dim], sin, cos)[0]  # GPT-J layout (B, T, H, rd)
    cache = cos_sin_cache_from_inv_freq(rope_inv_freq(rotary_dim), 256)
    oq, ok = apply_rotary_torch(q, None, positions, cache, is_neox=False)
    assert ok is None
    torch.testing.assert_close(oq[..., :rotary_dim], hq, atol=1e-5, rtol=1e-5)
    assert torch.equal(oq[..., rotary_dim:], q[..., rotary_dim:])


# fp32: identical math, 1e-6 level. fp16: both compute in fp32 and round once; cos/sin products can
# land on different sides of a rounding boundary -> one fp16 ulp (|x| < 8 -> 4e-3).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=1e-3)}


@pytest.mark.usefixtures("kernel_device")  # CUDA where there is a GPU (conftest.py)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_dim,rotary_dim", [(32, 32), (80, 40), (16, 8)])
@pytest.mark.parametrize("inplace", [False, True])
def test_triton_matches_reference(dtype, is_neox, head_dim, rotary_dim, inplace):
    q, k, positions = _inputs(7, 4, 2, head_dim, dtype, seed=2)
    cache = cos_sin_cache_from_inv_freq(rope_inv_freq(rotary_dim), 256)
    rq, rk = apply_rotary_torch(q, k, positions, cache, is_neox)
    tq, tk = q.clone(), k.clone()
    oq, ok = apply_rotary_triton(tq, tk, positions, cache, is_neox, inplace=inplace)
    assert (oq.data_ptr() == tq.data_ptr()) == inplace
    if not inplace:
        assert torch.equal(tq, q) and torch.equal(tk, k)  # inputs untouched
    torch.testing.assert_close(oq, rq, **TOL[dtype])
    torch.testing.assert_close(ok, rk, **TOL[dtype])


@pytest.mark.usefixtures("kernel_device")  # CUDA where there is a GPU (conftest.py)
def test_triton_on_strided_2d_views():
    # q and k as column slices of a fused qkv projection, (T, H * D) with head_dim given
    t, hq, hkv, d = 5, 4, 2, 16
    qkv = torch.randn(t, (hq + 2 * hkv) * d)
    q, k = qkv[:, : hq * d], qkv[:, hq * d : (hq + hkv) * d]
    positions = torch.arange(t) + 3
    cache = cos_sin_cache_from_inv_freq(rope_inv_freq(d), 64)
    rq, rk = apply_rotary_torch(q, k, positions, cache, head_dim=d)
    oq, ok = apply_rotary_triton(q, k, positions, cache, head_dim=d, inplace=True)
    torch.testing.assert_close(qkv[:, : hq * d], rq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv[:, hq * d : (hq + hkv) * d], rk, atol=1e-5, rtol=1e-5)
