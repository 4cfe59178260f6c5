"""ZeroGPU is detected (the variable, or a `spaces` package reporting zero_gpu) and refused with what to do."""

from __future__ import annotations

import sys
import types

import pytest

from backend.hosting import HostingError, on_zerogpu, refuse_zerogpu
from backend.hosting.zerogpu import ZEROGPU_MESSAGE


def stand_in_spaces(zero_gpu: bool) -> types.ModuleType:
    """A stand-in `spaces` package: spaces.config.Config.zero_gpu as the real one has it; its GPU decorator fails
    the test if anything calls it (detection must not wrap or run anything)."""
    spaces = types.ModuleType("spaces")
    spaces.config = types.SimpleNamespace(Config=types.SimpleNamespace(zero_gpu=zero_gpu))

    def gpu(*args, **kwargs):
        raise AssertionError("spaces.GPU must not be used by the detection")

    spaces.GPU = gpu
    return spaces


def test_variable(monkeypatch):
    monkeypatch.delitem(sys.modules, "spaces", raising=False)
    for value, zero in (("true", True), ("1", True), ("T", True), ("false", False), ("", False), ("0", False)):
        assert on_zerogpu({"SPACES_ZERO_GPU": value}) is zero, value
    assert not on_zerogpu({})


def test_spaces_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", stand_in_spaces(zero_gpu=True))
    assert on_zerogpu({})
    with pytest.raises(HostingError) as e:
        refuse_zerogpu({})
    assert str(e.value) == ZEROGPU_MESSAGE
    assert str(e.value).startswith("this Space runs on ZeroGPU")
    assert "pick CPU hardware (free) or a dedicated GPU" in str(e.value)
    monkeypatch.setitem(sys.modules, "spaces", stand_in_spaces(zero_gpu=False))
    assert not on_zerogpu({})
    refuse_zerogpu({})  # a Space on CPU or a dedicated GPU (spaces installed, not ZeroGPU) starts


def test_spaces_without_config_is_not_zerogpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", types.ModuleType("spaces"))
    assert not on_zerogpu({})


class _RefuseSpacesImport:
    """A meta path finder that records any attempt to import `spaces` (installed or not)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name == "spaces" or name.startswith("spaces."):
            self.asked.append(name)
        return None


def test_detection_does_not_import_spaces(monkeypatch):
    monkeypatch.delitem(sys.modules, "spaces", raising=False)
    finder = _RefuseSpacesImport()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    assert not on_zerogpu({})
    refuse_zerogpu({})
    assert finder.asked == []  # importing spaces on ZeroGPU patches torch: detection must only look
