"""backend/layers ops reproduce transformers' math bit for bit on CPU (bf16 included)."""

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.activations import ACT2FN
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from backend.layers.activation import act_and_mul
from backend.layers.norm import rms_norm
from backend.layers.rotary import apply_rotary, compute_cos_sin_cache, rope_step

DT = torch.bfloat16


@pytest.mark.parametrize("offset,hf_cls", [(0.0, LlamaRMSNorm), (1.0, GemmaRMSNorm)])
def test_rms_norm_matches_hf(offset, hf_cls):
    torch.manual_seed(0)
    x, r = torch.randn(5, 64, dtype=DT), torch.randn(5, 64, dtype=DT)
    hf = hf_cls(64, eps=1e-6).to(DT)
    torch.nn.init.normal_(hf.weight)
    with torch.no_grad():
        assert torch.equal(rms_norm(x, hf.weight, 1e-6, offset=offset), hf(x))
        out, res = rms_norm(x, hf.weight, 1e-6, residual=r, offset=offset)
        assert torch.equal(res, r + x) and torch.equal(out, hf(r + x))


@pytest.mark.parametrize("act,kind", [("silu", "silu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu")])
def test_act_and_mul_matches_hf(act, kind):
    x = torch.randn(7, 2 * 32, dtype=DT)
    assert torch.equal(act_and_mul(x, kind), ACT2FN[act](x[:, :32]) * x[:, 32:])


ROPES = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64),
    "llama3": dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    ),
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rotary_matches_hf_for_every_rope_type(rope):
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        rope_parameters=dict(ROPES[rope]),
    )
    cache = compute_cos_sin_cache(config, 32, 256)
    positions = torch.tensor([0, 1, 5, 63, 64, 200])
    torch.manual_seed(0)
    q, k = torch.randn(6, 2 * 32, dtype=DT), torch.randn(6, 32, dtype=DT)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    hf_q, hf_k = apply_rotary_pos_emb(
        q.view(1, 6, 2, 32).transpose(1, 2), k.view(1, 6, 1, 32).transpose(1, 2), cos, sin
    )
    got_q, got_k = apply_rotary(q, k, rope_step(positions, cache, DT), cache, 32)
    # same ops as HF; cos/sin are evaluated over differently shaped tensors (vectorised vs tail loops of the
    # fp32 cos may differ by an ulp), so allow one bf16 ulp
    torch.testing.assert_close(got_q, hf_q.transpose(1, 2).reshape(6, 64), atol=2**-7, rtol=2**-7)
    torch.testing.assert_close(got_k, hf_k.transpose(1, 2).reshape(6, 32), atol=2**-7, rtol=2**-7)


def test_partial_rotary_longrope_short_and_long_rows_match_hf():
    config = Phi3Config(
        hidden_size=64,
        num_attention_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=64,
        partial_rotary_factor=0.5,
        rope_parameters=dict(
            rope_type="longrope",
            rope_theta=10000.0,
            short_factor=[1.0] * 8,
            long_factor=[2.0] * 8,
            original_max_position_embeddings=64,
        ),
    )
    cache = compute_cos_sin_cache(config, 32, 256)  # (2P, 16): half of head_dim rotates; short rows, long rows
    assert cache.shape == (512, 16)
    short_cos, _ = Phi3RotaryEmbedding(config)(torch.zeros(1), torch.arange(64)[None])  # seq <= original: short
    torch.testing.assert_close(cache[:64, :8], short_cos[0, :, :8], atol=0, rtol=0)
    long_cos, _ = Phi3RotaryEmbedding(config)(torch.zeros(1), torch.arange(100)[None])  # seq > original: long
    torch.testing.assert_close(cache[256:356, :8], long_cos[0, :, :8], atol=0, rtol=0)
