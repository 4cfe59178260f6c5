"""Helpers for native-model tests."""

from __future__ import annotations

import torch


def prefill_logits(engine, token_ids: list[int]) -> torch.Tensor:  # (L, V)
    """Logits of every position of one prompt, from the engine's model (one uncached prefill)."""
    return engine.prompt_logits(token_ids)
