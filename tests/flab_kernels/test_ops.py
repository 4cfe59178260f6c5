"""flab_kernels.ops dispatch: torch on CPU by default, Triton (interpreter) with FLAB_FORCE_TRITON=1; the attention
backends' paged attention (the engine's entry points)."""

from __future__ import annotations

import pytest
import torch

import flab_kernels.paged_attention
import flab_kernels.paged_decode
from backend.layers.attention_backends import ATTENTION_BACKENDS, make_attention_backend
from flab_kernels import ops
from flab_kernels.attention_args import PagedAttentionArgs
from flab_kernels.attention_torch import paged_attention_torch, store_kv_torch
from flab_kernels.norm import rms_norm_torch
from tests.flab_kernels.helpers import make_paged_batch


def _batch(new, cached):
    return make_paged_batch(new, cached, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32)


def test_cpu_defaults_to_torch(monkeypatch):
    monkeypatch.delenv("FLAB_FORCE_TRITON", raising=False)

    def boom(*a, **k):
        raise AssertionError("Triton must not run on CPU without FLAB_FORCE_TRITON")

    monkeypatch.setattr(flab_kernels.paged_attention, "paged_attention_triton", boom)
    b = _batch([3, 1], [0, 20])
    backend = make_attention_backend("auto", torch.device("cpu"))  # outside an engine: the environment, read now
    assert backend.name == "torch"
    plan = backend.prepare(b.query_start_loc.tolist(), b.seq_lens.tolist(), b.block_tables, b.k_cache.shape[1])
    out = backend.attend(PagedAttentionArgs(*b.args(), 0.3, sliding_window=8, max_seq_len=b.max_seq_len), plan)
    torch.testing.assert_close(out, paged_attention_torch(*b.args(), 0.3, sliding_window=8), atol=1e-6, rtol=0)
    k = torch.randn(4, 2, 16)
    c1, c2 = torch.zeros(2, 16, 2, 16), torch.zeros(2, 16, 2, 16)
    slots = torch.tensor([0, 5, 16, 31])
    backend.store(k, k, c1, c1.clone(), slots)
    store_kv_torch(k, k, c2, c2.clone(), slots)
    assert torch.equal(c1, c2)
    x, w = torch.randn(3, 16), torch.randn(16)
    assert torch.equal(ops.rms_norm(x, w, 1e-6), rms_norm_torch(x, w, 1e-6))


@pytest.mark.parametrize(
    "forced,new,cached,expected",
    [
        ("auto", [1, 1], [2500, 100], "paged_decode_triton"),  # decode, 2 x 2 programs << 132 SMs, 2.6k context
        ("auto", [4, 1], [2500, 100], "paged_attention_triton"),  # mixed batch
        ("unified", [1, 1], [2500, 100], "paged_attention_triton"),
        ("split_kv", [1, 1], [10, 20], "paged_decode_triton"),
    ],
)
@pytest.mark.usefixtures("kernel_device")  # CUDA where there is a GPU (conftest.py)
def test_forced_triton_routes_and_matches(monkeypatch, forced, new, cached, expected):
    monkeypatch.setenv("FLAB_FORCE_TRITON", "1")
    monkeypatch.setenv("FLAB_ATTENTION_KERNEL", forced)
    called = []
    for module, name in (
        (flab_kernels.paged_attention, "paged_attention_triton"),
        (flab_kernels.paged_decode, "paged_decode_triton"),
    ):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name, **k: called.append(_n) or _r(*a, **k))
    b = _batch(new, cached)
    out = ops.paged_attention_triton(
        PagedAttentionArgs(*b.args(), 0.3, max_query_len=b.max_query_len, max_seq_len=b.max_seq_len)
    )
    assert called == [expected]
    torch.testing.assert_close(out, paged_attention_torch(*b.args(), 0.3), atol=2e-5, rtol=0)


@pytest.mark.usefixtures("kernel_device")  # CUDA where there is a GPU (conftest.py)
def test_forced_triton_small_ops(monkeypatch):
    monkeypatch.setenv("FLAB_FORCE_TRITON", "1")
    x = torch.randn(3, 32)
    torch.testing.assert_close(ops.silu_and_mul(x), torch.nn.functional.silu(x[:, :16]) * x[:, 16:])
    k = torch.randn(2, 2, 16)
    c = torch.zeros(2, 16, 2, 16)
    ATTENTION_BACKENDS["triton"]().store(k, k, c, c, torch.tensor([1, 17]))
    assert torch.equal(c.view(32, 2, 16)[[1, 17]], k)
