"""ModelRunner: build the step's tensors, run the model, sample."""

from __future__ import annotations

import torch
from torch import nn

from backend.core.forward_batch import ForwardBatch, build_forward_batch
from backend.core.kv_cache import KVCache
from backend.core.sampling import PromptLogprobs, SampleOutput, sample, score_prompt
from backend.core.scheduler import ScheduledBatch
from backend.layers.attention_backends import AttentionBackend
from backend.multimodal.step import ensure_image_features


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_cache: KVCache,
        device: torch.device,
        attention: AttentionBackend,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.attention = attention

    def describe(self) -> dict | None:
        """The device layout when it is more than this process (backend/distributed's runner); None here."""
        return None

    @torch.inference_mode()
    def logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """The model's logits rows of the batch (prompt-scoring rows first, then one per sampling sequence)."""
        ensure_image_features(self.model, batch.seqs)
        return self.model(build_forward_batch(batch, self.kv_cache, self.device, self.attention))

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> SampleOutput:
        """One forward pass over the batch; one sampled token per sequence whose step reaches its end, and the
        logprobs of the prompt tokens this step scores for requests that asked for prompt logprobs."""
        vision_s = ensure_image_features(self.model, batch.seqs)  # the vision tower, once per image-text request
        fb = build_forward_batch(batch, self.kv_cache, self.device, self.attention)
        logits = self.model(fb)  # (R, V): prompt-scoring rows (if any) + one row per sequence that samples
        prompt_logprobs = score_prompts(batch, fb, logits)
        if fb.sample_rows is not None:
            logits = logits[fb.sample_rows]  # (S', V)
        rows = [seq for seq, s in zip(batch.seqs, batch.sample) if s]
        if not rows:
            return SampleOutput([], None, None, prompt_logprobs, vision_s=vision_s)
        params = [s.params for s in rows]
        penalized = any(p.penalized for p in params)
        prompts = [s.prompt_token_ids for s in rows] if penalized else None
        outputs = [s.output_token_ids for s in rows] if penalized else None
        out = sample(logits, params, [s.generator for s in rows], prompts, outputs)
        out.prompt_logprobs = prompt_logprobs
        out.vision_s = vision_s
        return out


def score_prompts(batch: ScheduledBatch, fb: ForwardBatch, logits: torch.Tensor) -> dict[int, PromptLogprobs]:
    """Prompt logprobs of this step, by seq_id, from the rows `build_forward_batch` added for them."""
    scored = {}
    for r in fb.prompt_rows:
        seq = batch.seqs[r.seq_index]
        start = r.first_pos + 1  # the first prompt token these rows predict
        targets = seq.prompt_token_ids[start : start + r.count]
        scored[seq.seq_id] = score_prompt(
            logits[r.first_row : r.first_row + r.count], targets, start, seq.params.prompt_logprobs
        )
    return scored
