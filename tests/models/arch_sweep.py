"""The architecture sweep's pieces: a generic shrink of any transformers causal-LM config, and one arch's check.

For a model_type of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: build a tiny random model from its default
config shrunk (few layers, small hidden size, heads, experts, vocabulary; sizes that respect the usual
constraints), take HF generate()'s greedy tokens, and run the engine (model_impl="transformers", fp32, CPU).
The outcome is one of: "exact" (same tokens), "refused" (UnsupportedModelError at load, with its reason),
"skipped" (HF itself cannot build or generate the shrunk model), or "mismatch" (a failure of the test).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from backend import Engine, SamplingParams
from backend.errors import UnsupportedModelError
from backend.tools.tiny_models import build_tokenizer
from tests.helpers import PROMPTS, hf_greedy

N_NEW = 6
SWEEP_PROMPTS = PROMPTS[:2]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
MAX_PARAMETERS = 30_000_000  # a shrink that leaves a bigger model is reported, not run

# Generic shrink: standard key -> value (set only where the default config has the key, through attribute_map).
SHRINK: dict[str, object] = dict(
    num_hidden_layers=2,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    head_dim=HEAD_DIM,
    max_position_embeddings=512,
    sliding_window=8,
    # MoE
    num_local_experts=4,
    num_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_topk=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    # MLA (DeepSeek): K head 16 + 8 (nope + rope), V head 16: K and V head sizes differ
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    # other families' names for the same sizes
    ffn_dim=128,
    n_inner=128,
    ffn_hidden_size=128,
    dense_intermediate_size=128,
    expert_intermediate_size=32,
    rotary_dim=8,
    num_kv_heads=KV_HEADS,
    multi_query_group_num=KV_HEADS,
    word_embed_proj_dim=HIDDEN,
    kv_channels=HEAD_DIM,
    # state-space / linear-attention sizes (those models are refused, but HF must build them small)
    mamba_d_state=8,
    state_size=8,
    mamba_n_heads=8,
    mamba_d_head=16,
    mamba_headdim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    chunk_size=16,
    block_size=16,
)


@dataclass
class SweepResult:
    model_type: str
    outcome: str  # exact | refused | skipped | mismatch
    detail: str = ""


def _default_keys(config: PretrainedConfig) -> set[str]:
    return set(config.to_dict())


def shrink_overrides(model_type: str, vocab_size: int, special: dict) -> dict:
    """Constructor kwargs that shrink `model_type`'s default config (only keys it has)."""
    default = AutoConfig.for_model(model_type)
    keys = _default_keys(default)
    attr_map = getattr(type(default), "attribute_map", {}) or {}
    overrides: dict = {}
    for key, value in SHRINK.items():
        actual = attr_map.get(key, key)
        if actual in keys and actual not in overrides and getattr(default, actual, None) is not None:
            overrides[actual] = value
    head_dim_key = attr_map.get("head_dim", "head_dim")
    if "qk_rope_head_dim" in keys and head_dim_key in overrides:
        overrides[head_dim_key] = SHRINK["qk_rope_head_dim"]  # MLA: head_dim is the rope part
    kv_key = attr_map.get("num_key_value_heads", "num_key_value_heads")
    if "kv_lora_rank" in keys and kv_key in overrides:
        overrides[kv_key] = HEADS  # MLA expands the latent to every query head
    if "sliding_window" in overrides and not isinstance(getattr(default, "sliding_window"), int):
        del overrides["sliding_window"]
    layer_types = getattr(default, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and layer_types:
        kinds = list(dict.fromkeys(layer_types))  # each distinct kind once, in order of first appearance
        kinds = (kinds + kinds)[: max(2, len(kinds))]
        overrides["layer_types"] = kinds
        overrides[attr_map.get("num_hidden_layers", "num_hidden_layers")] = len(kinds)
    if "is_decoder" in keys:  # encoder families (BERT, RoBERTa...) generate causally as decoders
        overrides["is_decoder"] = True
    overrides[attr_map.get("vocab_size", "vocab_size")] = vocab_size
    overrides.update({k: v for k, v in special.items() if k in keys or k.endswith("token_id")})
    return overrides


def build_sweep_model(model_type: str, path: Path, **extra) -> tuple[PretrainedConfig, bool]:
    """Write the shrunk random model of `model_type` (`extra` overrides the shrink) with a tokenizer into `path`.
    Returns (config, built): built is False for a composite (multimodal) config, whose folder gets the config and a
    placeholder weight file only (the engine refuses such configs before reading weights)."""
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = AutoConfig.for_model(model_type, **{**shrink_overrides(model_type, len(tok), special), **extra})
    config.initializer_range = 0.1  # clear greedy winners (tiny_models.build_tiny_model does the same)
    tok.save_pretrained(path)
    if config.get_text_config() is not config:
        config.save_pretrained(path)
        save_file({"placeholder": torch.zeros(1)}, path / "model.safetensors")
        return config, False
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMETERS:
        raise RuntimeError(f"the shrunk model still has {n / 1e6:.0f}M parameters")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return config, True


def run_arch(model_type: str, path: Path) -> SweepResult:
    try:
        _, built = build_sweep_model(model_type, path)
    except Exception as e:
        return SweepResult(model_type, "skipped", f"HF fails to build the shrunk model: {type(e).__name__}: {e}")
    expected = None
    if built:
        try:
            expected = hf_greedy(path, SWEEP_PROMPTS, N_NEW)
        except Exception as e:
            return SweepResult(model_type, "skipped", f"HF fails to generate: {type(e).__name__}: {e}")
    try:
        engine = Engine(str(path), model_impl="transformers", dtype="float32", device="cpu", kv_cache_memory_gb=0.05)
    except UnsupportedModelError as e:
        return SweepResult(model_type, "refused", str(e))
    with engine:
        if expected is None:
            return SweepResult(model_type, "mismatch", "the engine accepted a multimodal config")
        params = SamplingParams(max_new_tokens=N_NEW, temperature=0.0, ignore_eos=True)
        got = [o.token_ids for o in engine.generate(SWEEP_PROMPTS, params)]
    if got != expected:
        return SweepResult(model_type, "mismatch", f"engine {got} != HF {expected}")
    return SweepResult(model_type, "exact")


def write_report(results: dict[str, SweepResult], file: Path) -> None:
    file.write_text(json.dumps({k: [r.outcome, r.detail] for k, r in sorted(results.items())}, indent=1))
