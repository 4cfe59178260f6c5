"""The unified vs split-KV rule (pure function; the numbers are the unmeasured defaults)."""

from __future__ import annotations

import pytest
import torch

from flab_kernels.attention_choice import SPLIT_KV, UNIFIED, KernelChoiceConfig, choose_attention_kernel
from flab_kernels.ops import attention_kernel_for

SM = 132


def test_prefill_or_mixed_batch_is_unified():
    assert choose_attention_kernel(2, 300, 8, 32768, SM).kernel == UNIFIED
    assert choose_attention_kernel(2, 2, 8, 32768, SM, max_query_len=4).kernel == UNIFIED


def test_short_context_is_unified():
    assert choose_attention_kernel(1, 1, 8, 1024, SM).kernel == UNIFIED


def test_many_sequences_fill_the_gpu_unified():
    assert choose_attention_kernel(64, 64, 8, 32768, SM).kernel == UNIFIED  # 512 programs >= 132 SMs


def test_few_long_sequences_split():
    choice = choose_attention_kernel(1, 1, 8, 32768, SM)
    assert choice.kernel == SPLIT_KV
    assert choice.num_splits == 33  # ceil(132 * 2 / 8); 32768 // 512 = 64 and max 64 do not bind


def test_splits_capped_by_context_and_max():
    assert choose_attention_kernel(1, 1, 1, 4096, SM).num_splits == 8  # 4096 // 512
    assert choose_attention_kernel(1, 1, 1, 1 << 20, SM).num_splits == 64  # max_splits
    cfg = KernelChoiceConfig(min_context=512, max_splits=4)
    assert choose_attention_kernel(1, 1, 1, 1024, SM, cfg) == choose_attention_kernel(1, 1, 1, 1024, SM, cfg)
    assert choose_attention_kernel(1, 1, 1, 1024, SM, cfg).num_splits == 2


def test_fewer_than_two_splits_is_unified():
    # 100 programs on 132 SMs would want ceil(264 / 100) = 3 splits, but 2048 // 2048 = 1 split fits
    cfg = KernelChoiceConfig(min_tokens_per_split=2048)
    assert choose_attention_kernel(25, 25, 4, 2048, SM, cfg).kernel == UNIFIED


@pytest.mark.parametrize("forced,expected", [("unified", UNIFIED), ("split_kv", SPLIT_KV), ("auto", UNIFIED)])
def test_env_override(monkeypatch, forced, expected):
    monkeypatch.setenv("FLAB_ATTENTION_KERNEL", forced)
    assert attention_kernel_for(64, 64, 8, 4096, torch.device("cpu")).kernel == expected
    assert attention_kernel_for(2, 10, 8, 4096, torch.device("cpu")).kernel == UNIFIED  # prefill never splits


def test_env_override_rejects_unknown(monkeypatch):
    monkeypatch.setenv("FLAB_ATTENTION_KERNEL", "fast")
    with pytest.raises(ValueError, match="FLAB_ATTENTION_KERNEL"):
        attention_kernel_for(1, 1, 1, 10, torch.device("cpu"))
