"""The memory estimate and the engine's check before it loads count an image-text model's vision tower and projector
(backend/loading/memory.py, memory_check.py): their bytes are part of the weights, and said apart in the notes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from backend.core.config import EngineConfig
from backend.core.errors import KVCacheError
from backend.loading import memory_check
from backend.loading.memory import EngineKVSettings, estimate_memory


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_estimate_counts_the_vision_tower(family, tiny_vlm):
    path = tiny_vlm(family)
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    inner = hf.model
    vision = [getattr(inner, n) for n in ("vision_tower", "visual", "multi_modal_projector") if hasattr(inner, n)]
    vision_bytes = sum(parameter_bytes(m) for m in vision)
    assert vision_bytes > 0
    est = estimate_memory(str(path), dtype="float32")
    assert est.weight_bytes == parameter_bytes(hf)  # language model, vision tower and projector
    assert est.vision_bytes == vision_bytes
    assert any(note.startswith("the vision tower and projector: ") for note in est.notes)


def test_the_check_before_load_counts_the_vision_tower(tiny_vlm, monkeypatch):
    """Free memory that holds the language model's weights and the KV budget but not the vision tower: refused."""
    path = tiny_vlm("llava")
    cfg = EngineConfig.from_kwargs(str(path), device="cpu", dtype="float32", kv_cache_memory_gb=0.001)
    kv = EngineKVSettings(cfg.block_size, cfg.kv_cache_memory_gb, cfg.num_kv_blocks, cfg.max_model_len, cfg.device)
    est = estimate_memory(str(path), dtype="float32", engine=kv)
    language_only = est.weight_bytes - est.vision_bytes + est.kv_cache_bytes
    assert est.load_peak_bytes == est.weight_bytes
    monkeypatch.setattr(memory_check, "free_memory", lambda device: (language_only + est.vision_bytes // 2, "RAM"))
    with pytest.raises(KVCacheError, match=r"^kv_cache_memory_gb=0.001 asks for a KV cache of .*; with the weights"):
        memory_check.check_before_load(cfg)
    monkeypatch.setattr(memory_check, "free_memory", lambda device: (language_only + est.vision_bytes, "RAM"))
    memory_check.check_before_load(cfg)  # all of it fits: no error
