"""The one dispatch rule (flab_kernels/dispatch.py): torch on CPU tensors, Triton on CUDA or when forced. Each op's
Triton entry point is replaced by a recorder, so a wrong dispatch is caught (not just equal results)."""

from __future__ import annotations

import pytest
import torch

import flab_kernels.activation
import flab_kernels.kv_store
import flab_kernels.norm
import flab_kernels.ops
import flab_kernels.rotary
from flab_kernels import dispatch, ops
from flab_kernels.dispatch import KernelSettings
from flab_kernels.rotary import cos_sin_cache_from_inv_freq, rope_inv_freq
from tests.flab_kernels.helpers import make_paged_batch


class Called(Exception):
    pass


def _recorder(name):
    def record(*args, **kwargs):
        raise Called(name)

    return record


def _paged_batch():
    return make_paged_batch(
        [3, 1], [0, 20], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32
    )


OPS = {
    "rms_norm": (flab_kernels.norm, "rms_norm_triton", lambda: ops.rms_norm(torch.randn(3, 16), torch.randn(16), 1e-6)),
    "apply_rotary": (
        flab_kernels.rotary,
        "apply_rotary_triton",
        lambda: ops.apply_rotary(
            torch.randn(3, 2, 16),
            torch.randn(3, 1, 16),
            torch.arange(3),
            cos_sin_cache_from_inv_freq(rope_inv_freq(16), 64),
        ),
    ),
    "silu_and_mul": (flab_kernels.activation, "silu_and_mul_triton", lambda: ops.silu_and_mul(torch.randn(3, 16))),
    "gelu_and_mul": (flab_kernels.activation, "gelu_and_mul_triton", lambda: ops.gelu_and_mul(torch.randn(3, 16))),
    "store_kv": (
        flab_kernels.kv_store,
        "store_kv_triton",
        lambda: ops.store_kv(
            torch.randn(2, 2, 16),
            torch.randn(2, 2, 16),
            torch.zeros(2, 16, 2, 16),
            torch.zeros(2, 16, 2, 16),
            torch.tensor([0, 17]),
        ),
    ),
    "paged_attention": (
        flab_kernels.ops,
        "paged_attention_triton_auto",
        lambda: ops.paged_attention(*_paged_batch().args(), 0.25),
    ),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_cpu_tensors_run_torch_and_forcing_runs_triton(op, monkeypatch):
    module, name, call = OPS[op]
    monkeypatch.setattr(module, name, _recorder(name))
    with dispatch.using(KernelSettings(force_triton=False)):
        call()  # the torch math: the recorder is not reached
    with dispatch.using(KernelSettings(force_triton=True)):
        with pytest.raises(Called, match=name):
            call()


def test_environment_is_validated_once():
    assert KernelSettings.from_env({}) == KernelSettings()
    assert KernelSettings.from_env({"FLAB_FORCE_TRITON": "1", "FLAB_ATTENTION_KERNEL": "split_kv"}) == KernelSettings(
        True, "split_kv"
    )
    with pytest.raises(ValueError, match="FLAB_FORCE_TRITON"):
        KernelSettings.from_env({"FLAB_FORCE_TRITON": "yes"})
    with pytest.raises(ValueError, match="FLAB_ATTENTION_KERNEL"):
        KernelSettings.from_env({"FLAB_ATTENTION_KERNEL": "fast"})


def test_settings_in_effect_ignore_later_environment_changes(monkeypatch):
    with dispatch.using(KernelSettings()):
        monkeypatch.setenv("FLAB_ATTENTION_KERNEL", "typo")
        monkeypatch.setenv("FLAB_FORCE_TRITON", "1")
        assert dispatch.current() == KernelSettings()
        assert not dispatch.use_triton(torch.zeros(1))


def test_engine_refuses_a_bad_override_at_start(tiny_model, monkeypatch):
    from backend import Engine
    from backend.errors import EngineError

    monkeypatch.setenv("FLAB_ATTENTION_KERNEL", "fast")
    with pytest.raises(EngineError, match="FLAB_ATTENTION_KERNEL"):
        Engine(str(tiny_model("llama")), dtype="float32", max_model_len=64)
