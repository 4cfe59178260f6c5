"""The one dispatch rule (flab_kernels/dispatch.py): inside an engine the kernels its attention backend chose, for
every op and every layer; outside, torch on CPU tensors, Triton on CUDA or when forced. Each op's Triton entry point
is replaced by a recorder, so a wrong dispatch is caught (not just equal results)."""

from __future__ import annotations

import pytest
import torch

import backend.layers.activation
import backend.layers.norm
import flab_kernels.activation
import flab_kernels.kv_store
import flab_kernels.norm
import flab_kernels.rotary
from backend.layers.attention_backends import ATTENTION_BACKENDS, engine_kernel_settings, make_attention_backend
from flab_kernels import dispatch, ops
from flab_kernels.dispatch import KernelSettings
from flab_kernels.rotary import cos_sin_cache_from_inv_freq, rope_inv_freq


class Called(Exception):
    pass


def _recorder(name):
    def record(*args, **kwargs):
        raise Called(name)

    return record


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


LAYER_CALLS = {  # the model layers' own entry points: they follow the same rule
    "rms_norm": lambda: backend.layers.norm.rms_norm(torch.randn(3, 16), torch.randn(16), 1e-6),
    "silu_and_mul": lambda: backend.layers.activation.act_and_mul(torch.randn(3, 16), "silu"),
    "gelu_and_mul": lambda: backend.layers.activation.act_and_mul(torch.randn(3, 16), "gelu_tanh"),
}


@pytest.mark.parametrize("op", sorted(LAYER_CALLS))
def test_layers_run_the_kernels_the_engine_chose(op, monkeypatch):
    module, name, _ = OPS[op]
    monkeypatch.setattr(module, name, _recorder(name))
    with dispatch.using(KernelSettings(force_triton=True, triton=False)):  # a torch-backend engine
        LAYER_CALLS[op]()
    with dispatch.using(KernelSettings(triton=True)):  # a triton-backend engine, on CPU tensors too
        with pytest.raises(Called, match=name):
            LAYER_CALLS[op]()


@pytest.mark.parametrize(
    "requested,device,force,expected",
    [
        ("auto", "cpu", False, "torch"),
        ("auto", "cpu", True, "triton"),
        ("auto", "cuda", False, "triton"),
        ("torch", "cuda", True, "torch"),
        ("triton", "cpu", False, "triton"),
    ],
)
def test_the_attention_backend_decides_the_engines_kernels(requested, device, force, expected, monkeypatch):
    monkeypatch.setenv("FLAB_FORCE_TRITON", "1" if force else "0")
    settings = engine_kernel_settings(requested, torch.device(device))
    assert settings.triton == (expected == "triton") and settings.force_triton == force
    with dispatch.using(settings):
        assert make_attention_backend(requested, torch.device(device)).name == expected


def test_each_attention_backend_stores_with_its_own_kernel(monkeypatch):
    monkeypatch.setattr(flab_kernels.kv_store, "store_kv_triton", _recorder("store_kv_triton"))
    k, cache, slots = torch.randn(2, 2, 16), torch.zeros(2, 16, 2, 16), torch.tensor([0, 17])
    with dispatch.using(KernelSettings(force_triton=True)):  # the backend decides, not the setting
        ATTENTION_BACKENDS["torch"]().store(k, k, cache, cache.clone(), slots)
    with pytest.raises(Called, match="store_kv_triton"):
        ATTENTION_BACKENDS["triton"]().store(k, k, cache, cache.clone(), slots)


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
    from backend.core.errors import EngineError

    monkeypatch.setenv("FLAB_ATTENTION_KERNEL", "fast")
    with pytest.raises(EngineError, match="FLAB_ATTENTION_KERNEL"):
        Engine(str(tiny_model("llama")), dtype="float32", max_model_len=64)
