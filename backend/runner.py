"""ModelRunner: build the step's tensors, run the model, sample."""

from __future__ import annotations

import torch
from torch import nn

from backend.forward_batch import build_forward_batch
from backend.kv_cache import KVCache
from backend.sampling import SampleOutput, sample
from backend.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: nn.Module, kv_cache: KVCache, device: torch.device, attention_backend: str) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.attention_backend = attention_backend

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> SampleOutput:
        """One forward pass over the batch; one sampled token per sequence whose step reaches its end."""
        fb = build_forward_batch(batch, self.kv_cache, self.device, self.attention_backend)
        logits = self.model(fb)  # (R, V), R = sequences that sample
        rows = [seq for seq, s in zip(batch.seqs, batch.sample) if s]
        if not rows:
            return SampleOutput([], None, None)
        params = [s.params for s in rows]
        history = [s.all_token_ids for s in rows] if any(p.repetition_penalty != 1.0 for p in params) else []
        return sample(logits, params, [s.generator for s in rows], history)
