"""The image-text-to-text sweep's pieces: shrink any transformers VLM config, and one model type's verdict.

For a model_type of transformers' MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES: its default config with the language
model shrunk like the causal-LM sweep's (tests/models/arch_sweep.py) and every other sub-config (the vision tower)
shrunk by VISION_SHRINK; HF generate()'s greedy tokens on text-only prompts; the engine (fp32, CPU; the folder has no
processor files, so it serves text only). Outcomes as in the causal-LM sweep: "exact", "refused" (at load, with the
reason), "skipped" (HF cannot build or run the shrunk model), "mismatch" (a failure).

A type that is exact text-only and has a tiny family with a processor (backend/tools/tiny_vlms.py) is then checked
with images too: image-text and text-only requests in one batch, greedy tokens against HF generate() with the same
image+text inputs; its detail says "images: exact", or why its image requests are refused; a mismatch fails it.
The other exact types are exact text-only ("images: not checked": no tiny processor for that type).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig

from backend import Engine, SamplingParams
from backend.core.errors import RequestError, UnsupportedModelError
from backend.loading.tiny_models import build_tokenizer
from backend.tools.tiny_vlms import FAMILIES, build_tiny_vlm
from tests.models.arch_sweep import (
    HIDDEN,
    MAX_PARAMETERS,
    N_NEW,
    SWEEP_PROMPTS,
    SweepResult,
    _is_pattern,
    _merged,
    _shrink_sizes,
)
from tests.models.vlm_reference import hf_vlm_greedy, random_images

# Sizes of a vision tower (or audio / projector sub-config), set where its default config has the key.
VISION_SHRINK: dict[str, object] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    depth=2,
    embed_dim=32,
    num_heads=2,
    out_hidden_size=HIDDEN,  # Qwen-VL: the merger projects to the language model's width
    projection_dim=32,
    text_hidden_size=HIDDEN,
    num_layers=2,
)


def _shrink_tree(config: PretrainedConfig, text: PretrainedConfig, vocab: int, special: dict) -> dict:
    """Overrides for each sub-config of `config`: the language model's by the causal-LM shrink, the others' by
    VISION_SHRINK; each a whole dict (its defaults merged with the shrink), as the config constructors take them."""
    out: dict = {}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if not isinstance(sub, PretrainedConfig):
            continue
        default = sub.to_dict()
        if sub is text:
            shrink = _shrink_sizes(sub, vocab) | {k: v for k, v in special.items() if k in default}
            shrink |= _shrink_mrope(sub, default, shrink)
        elif _contains(sub, text):
            shrink = _shrink_tree(sub, text, vocab, special)
        else:
            shrink = {k: v for k, v in VISION_SHRINK.items() if k in default and default[k] is not None}
            shrink |= _shrink_patterns(default, shrink)
        out[key] = _merged(default, shrink)
        if "per_layer_config" in shrink:  # the shrunk layers' overrides replace the default's (other layer indices)
            out[key]["per_layer_config"] = shrink["per_layer_config"]
    return out


def _shrink_patterns(default: dict, shrink: dict) -> dict:
    """A shrunk tower's per-layer fields (layer_types, ...) cut to its shrunk layer count, per-layer overrides
    dropped (they name layers of the default depth)."""
    layers = int(default.get("num_hidden_layers") or 0)
    kept = shrink.get("num_hidden_layers")
    if not kept or layers <= kept:
        return {}
    out: dict = {k: list(v)[:kept] for k, v in default.items() if _is_pattern(v, layers)}
    if default.get("per_layer_config"):
        out["per_layer_config"] = {}
    return out


def _shrink_mrope(text: PretrainedConfig, default: dict, shrink: dict) -> dict:
    """M-RoPE sections (time, height, width) that sum to half the shrunk rotary head size (the modeling code's
    default sections fit the default head size only)."""
    if "mrope_section" not in (getattr(type(text), "ignore_keys_at_rope_validation", None) or ()):
        return {}
    rope = dict(default.get("rope_parameters") or {})
    head = shrink.get("head_dim") or shrink.get("hidden_size", HIDDEN) // shrink.get("num_attention_heads", 4)
    half = int(head * float(rope.get("partial_rotary_factor", default.get("partial_rotary_factor") or 1.0))) // 2
    first = max(1, half // 4)
    rest = half - first
    return {"rope_parameters": dict(rope, mrope_section=[first, rest - rest // 2, rest // 2])}


def _contains(config: PretrainedConfig, target: PretrainedConfig) -> bool:
    subs = [getattr(config, k, None) for k in getattr(config, "sub_configs", {}) or {}]
    return any(s is target or (isinstance(s, PretrainedConfig) and _contains(s, target)) for s in subs)


def build_sweep_vlm(model_type: str, path: Path) -> None:
    """Write the shrunk random VLM of `model_type` with a tokenizer (no processor) into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    default = AutoConfig.for_model(model_type)
    overrides = _shrink_tree(default, default.get_text_config(), len(tok), special)
    config = AutoConfig.for_model(model_type, **overrides)
    config.initializer_range = 0.1
    config.get_text_config().initializer_range = 0.1
    with torch.device("meta"):
        meta = AutoModelForImageTextToText.from_config(config)
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMETERS:
        raise RuntimeError(f"the shrunk model still has {n / 1e6:.0f}M parameters")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def run_vlm(model_type: str, path: Path) -> SweepResult:
    try:
        build_sweep_vlm(model_type, path)
    except Exception as e:
        return SweepResult(model_type, "skipped", f"HF fails to build the shrunk model: {type(e).__name__}: {e}")
    expected, hf_error = None, ""
    try:
        expected = hf_vlm_greedy(path, SWEEP_PROMPTS, N_NEW)
    except Exception as e:
        hf_error = f"HF fails to generate: {type(e).__name__}: {e}"
    try:
        engine = Engine(str(path), dtype="float32", device="cpu", kv_cache_memory_gb=0.05)
    except UnsupportedModelError as e:
        return SweepResult(model_type, "refused", str(e) + (f" [{hf_error[:200]}]" if hf_error else ""))
    with engine:
        if hf_error:
            return SweepResult(model_type, "skipped", f"{hf_error} (the engine accepts it: no reference to compare)")
        params = SamplingParams(max_new_tokens=N_NEW, temperature=0.0, ignore_eos=True)
        got = [o.token_ids for o in engine.generate(SWEEP_PROMPTS, params)]
    if got != expected:
        return SweepResult(model_type, "mismatch", f"engine {got} != HF {expected}")
    return image_check(model_type, path.parent / f"{model_type}-images")


def image_check(model_type: str, path: Path) -> SweepResult:
    """The verdict of a type exact text-only: with images too where a tiny family with a processor exists."""
    family = FAMILIES.get(model_type)
    if family is None or family.processor is None:
        return SweepResult(model_type, "exact", "text only; images: not checked (no tiny processor for this type)")
    build_tiny_vlm(model_type, path)
    image = family.image_text
    prompts = [f"Hello {image} world! Once upon", f"{image} The quick brown fox {image}", "1 2 3 4 5 6 7"]
    a, b, c = random_images(3)
    images = [[a], [b, c], None]
    params = SamplingParams(max_new_tokens=N_NEW, temperature=0.0, ignore_eos=True)
    with Engine(str(path), dtype="float32", device="cpu", kv_cache_memory_gb=0.05) as engine:
        try:
            got = [o.token_ids for o in engine.generate(prompts, params, images=images)]
        except RequestError as e:
            return SweepResult(model_type, "exact", f"text exact; images refused: {e}")
    expected = hf_vlm_greedy(path, prompts, N_NEW, images)
    if got != expected:
        return SweepResult(model_type, "mismatch", f"with images: engine {got} != HF {expected}")
    return SweepResult(model_type, "exact", "text and images: exact")
