"""Every image-text-to-text model type transformers ships: text-only greedy tokens through the engine equal HF
generate()'s, or the engine refuses the model at load with the reason (tests/models/vlm_sweep.py). A model that runs
with different tokens fails. Types with a tiny family and processor (backend/tools/tiny_vlms.py) are checked with
images too. The default run covers LLaVA and Gemma 3 (bidirectional spans among an image's tokens); the whole sweep
is `-m slow`, its counts in the session's "architecture sweep" summary (keys `image-text:<model_type>`) and in
docs/vlm.md."""

from __future__ import annotations

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from tests.models.vlm_sweep import run_vlm

FAST = {"llava", "gemma3"}  # both exact, with images too
ALL = sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


@pytest.mark.parametrize("model_type", [t if t in FAST else pytest.param(t, marks=pytest.mark.slow) for t in ALL])
def test_image_text_model_is_exact_or_refused(model_type, tmp_path, arch_sweep_results):
    result = run_vlm(model_type, tmp_path / model_type)
    arch_sweep_results[f"image-text:{model_type}"] = result
    if result.outcome == "skipped":
        pytest.skip(f"skipped: HF fails ({result.detail[:200]})")
    assert result.outcome in ("exact", "refused"), f"{model_type}: {result.detail}"
    if result.outcome == "refused":
        assert len(result.detail) > 40, f"{model_type}: refusal without a reason: {result.detail!r}"
    if model_type in FAST:
        assert result.outcome == "exact" and result.detail == "text and images: exact", result


def test_fast_subset_exists_in_this_transformers():
    assert FAST <= set(ALL), sorted(FAST - set(ALL))
