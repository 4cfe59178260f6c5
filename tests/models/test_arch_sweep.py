"""Every causal-LM architecture transformers ships: our greedy tokens equal HF generate()'s, or the engine
refuses the model at load with an UnsupportedModelError. A model that runs with different tokens fails.

The default run covers a representative subset (MQA, MLA, kv_channels head size, two attention calls per
layer, linear attention (refused), sliding window + softcap, sinks, MoE, per-layer head sizes, a looped block);
the whole sweep is `-m slow`. The counts (exact / refused / skipped because HF itself fails) are printed at the
end of the session (tests/models/conftest.py); set ARCH_SWEEP_REPORT=<file> to also write them as JSON.
"""

from __future__ import annotations

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tests.models.arch_sweep import run_arch

FAST = {
    "gpt_bigcode",  # multi-query attention
    "deepseek_v3",  # MLA: K head size != V head size
    "jetmoe",  # head size kv_channels, MoE attention
    "diffllama",  # two attention calls per layer
    "minimax",  # linear-attention layers: refused
    "gemma2",  # sliding window, attention softcap
    "gemma3_text",  # sliding + full layers
    "gpt_oss",  # attention sinks, MoE
    "qwen2_moe",  # MoE with shared expert
    "gemma4_text",  # per-layer config: full-attention layers of another head size (per_layer_config)
    "dory",  # a looped block: the same attention module called once per loop in a forward
}
ALL = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.mark.parametrize("model_type", [t if t in FAST else pytest.param(t, marks=pytest.mark.slow) for t in ALL])
def test_architecture_is_exact_or_refused(model_type, tmp_path, arch_sweep_results):
    result = run_arch(model_type, tmp_path / model_type)
    arch_sweep_results[model_type] = result
    if result.outcome == "skipped":
        pytest.skip(f"skipped: HF fails ({result.detail[:200]})")
    assert result.outcome in ("exact", "refused"), f"{model_type}: {result.detail}"
    if result.outcome == "refused":
        assert len(result.detail) > 40, f"{model_type}: refusal without a reason: {result.detail!r}"


NEWER_THAN_OLDEST = {"dory"}  # added after transformers 5.17, the oldest we test (.ci/oldest.txt)


def test_fast_subset_exists_in_this_transformers():
    assert FAST - NEWER_THAN_OLDEST <= set(ALL), sorted(FAST - set(ALL))
