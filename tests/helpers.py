"""Reference outputs from transformers itself, for equality tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "Hello world! Once upon",
    "The quick brown fox jumps over the lazy dog. A paged KV cache splits memory into blocks.",
    "1 2 3",
    "Attention is all you need; transformers, tokens",
]


def hf_greedy(path, prompts: list[str], max_new_tokens: int, trust_remote_code: bool = False) -> list[list[int]]:
    """Greedy continuation of each prompt with HF generate() (fp32, CPU, one prompt at a time)."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.generation_config.eos_token_id = None  # like ignore_eos=True: always max_new_tokens tokens
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        outs.append(gen[0, ids.shape[1] :].tolist())
    return outs


def hf_logits(path, token_ids: list[int]) -> torch.Tensor:
    """Full-sequence logits (L, V) from HF for one prompt."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll `condition` every 10 ms until it holds (True) or `timeout` seconds pass (False): for states another
    thread reaches (an engine step, a server's abort); the test then asserts on the state, never on the time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False
