"""The architecture sweep's pieces: a generic shrink of any transformers causal-LM config, and one arch's check.

For a model_type of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: build a tiny random model from its default
config shrunk (few layers, small hidden size, heads, experts, vocabulary; sizes that respect the usual
constraints), take HF generate()'s greedy tokens, and run the engine (model_impl="transformers", fp32, CPU).
The outcome is one of: "exact" (same tokens), "refused" (UnsupportedModelError at load, with its reason),
"skipped" (HF itself cannot build the shrunk model, or cannot generate with a model the engine accepts), or
"mismatch" (a failure of the test).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from backend import Engine, SamplingParams
from backend.core.errors import UnsupportedModelError
from backend.loading.tiny_models import build_tokenizer
from backend.models.vlm import is_image_text_config
from tests.helpers import PROMPTS, hf_greedy

N_NEW = 6
SWEEP_PROMPTS = PROMPTS[:2]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
MAX_PARAMETERS = 30_000_000  # a shrink that leaves a bigger model is reported, not run
# Sizes set even where the default config leaves them None: there None is no "feature off" but a value every real
# checkpoint fills in (HF's default MinistralConfig / HunYuan have head_dim None, Nemotron num_key_value_heads None,
# Dots1 / DeepSeek-V2 their expert counts None, and their modeling code cannot run with None).
NONE_MEANS_UNSET = {
    "head_dim",
    "num_key_value_heads",
    "n_group",
    "topk_group",
    "num_experts_per_tok",
    "n_routed_experts",
    "n_shared_experts",
}

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
    # encoder-decoder families (BART, Whisper...) run their decoder as a causal LM: both halves' own sizes
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=HEADS,
    decoder_attention_heads=HEADS,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    # other families' names for the same sizes
    ffn_dim=128,
    n_inner=128,
    ffn_hidden_size=128,
    dense_intermediate_size=128,
    expert_intermediate_size=32,
    rotary_dim=8,
    num_kv_heads=KV_HEADS,
    swa_num_attention_heads=HEADS,
    swa_num_key_value_heads=KV_HEADS,
    swa_head_dim=HEAD_DIM,
    multi_query_group_num=KV_HEADS,
    word_embed_proj_dim=HIDDEN,
    kv_channels=HEAD_DIM,
    # state-space / linear-attention sizes (those models are refused, but HF must build them small)
    mamba_d_state=8,
    state_size=8,
    mamba_n_heads=8,
    mamba_d_head=16,
    mamba_headdim=16,
    mamba_d_ssm=128,  # mamba_n_heads x mamba_d_head
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    chunk_size=16,
    block_size=16,
    # per-layer input embeddings (Gemma 3n / 4): their own table of vocab_size_per_layer_input rows
    hidden_size_per_layer_input=16,
)

# Per-architecture constructor kwargs, applied over the generic shrink: where HF's default config cannot build a
# model, or the shrink needs keys of one family's own naming. Each says why.
OVERRIDES: dict[str, dict] = {
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not define (real checkpoints set
    # it), and clamps q/k/v by clip_qkv without a None check (real ones: 8); the attention / FFN sizes live in the
    # two sub-configs
    "dbrx": dict(
        attn_config=dict(kv_n_heads=KV_HEADS, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(hidden_size=HIDDEN, ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2),
    ),
    # the default config fails its own validation (a draft model for Gemma 4: its text config has no per-layer inputs)
    "gemma4_assistant": dict(text_config=dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)),
    # the last num_kv_shared_layers layers reuse the K/V of the last earlier layer of their kind: four layers, the
    # last two shared; one activation-sparsity entry per layer
    "gemma3n_text": dict(
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_hidden_layers=4,
        num_kv_shared_layers=2,
        activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
        laurel_rank=8,
    ),
    # its sliding-window layer (the third of the shrink) has its own MLA sizes, of head_dim qk_nope + qk_rope
    "dots3_note_text": dict(
        per_layer_config={
            2: dict(num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=32, qk_nope_head_dim=24, head_dim=32)
        }
    ),
    # hidden_size x expand (128) must equal num_heads x head_dim (16, the shrink's): 8 SSM heads in one group
    "mamba2": dict(num_heads=8, n_groups=1, time_step_rank=8),
    # hybrids whose layer pattern is a derived property (not a field): shrunk through the fields it derives from,
    # so that the two layers are one state-space / recurrent layer and one attention layer (HF's generate() fails on
    # a cache without attention layers)
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1]),
    "recurrent_gemma": dict(num_hidden_layers=3),  # block_types repeats recurrent, recurrent, attention
    # the default layer_types is Mamba layers only
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),
    # released configs list each layer as an attention block then an "mlp" block (halved on load): three layers, one
    # each of input, recurrent (looped) and output
    "dory": dict(
        layer_types=["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"],
        num_hidden_layers=6,
        n_input_layers=2,
        n_recurrent_layers=2,
        n_output_layers=2,
    ),
    # its indexer's heads share one key head: at most the query heads per key head (HEADS / KV_HEADS); one of the two
    # layers indexed
    "kolibri1_1": dict(index_num_heads=HEADS // KV_HEADS, index_layers=[1]),
    # ZAYA supports one expert per token only
    "zaya": dict(num_experts_per_tok=1),
    # the default config's rope_parameters is empty, but the model reads it per layer type
    "cohere_compass_text": dict(rope_parameters={"full_attention": dict(rope_type="default", rope_theta=10000.0)}),
    # Zamba ties its shared transformer block across the hybrid layers: two of them; its attention reads the hidden
    # state concatenated with the embeddings (2 x hidden_size)
    "zamba": dict(
        layers_block_type=["linear_attention", "hybrid", "hybrid"],
        num_hidden_layers=3,
        attention_hidden_size=2 * HIDDEN,
        attention_head_dim=2 * HIDDEN // HEADS,
        mamba_dt_rank=8,
    ),
    # its layer count is num_layers (no attribute_map entry); MLA with zero-computation experts
    "longcat_flash": dict(
        num_layers=2, zero_expert_num=2, qk_head_dim=SHRINK["qk_nope_head_dim"] + SHRINK["qk_rope_head_dim"]
    ),
    # axial position embeddings: their dims sum to hidden_size, their shape multiplies to the longest sequence
    "reformer": dict(axial_pos_embds_dim=[16, 48], axial_pos_shape=[16, 32], attention_head_size=HEAD_DIM),
    # xLSTM names its width embedding_dim and its layer count num_blocks (beside hidden_size / num_hidden_layers)
    "xlstm": dict(embedding_dim=HIDDEN, num_blocks=2, num_heads=HEADS, qk_dim_factor=1.0),
    # GIT (image-to-text) carries a CLIP-like vision tower: shrunk too
    "git": dict(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        )
    ),
    # BLT (byte latent; HF's generate() fails on it at any size: its cache reads config.num_hidden_layers, which
    # BltConfig lacks; the engine refuses it at load): its byte-group hash embeddings have
    # encoder_hash_byte_group_vocab rows per group size, and its local encoder / decoder project to the global
    # model's width (hidden_size_global)
    "blt": dict(
        encoder_hash_byte_group_vocab=64,
        encoder_config=dict(hidden_size_global=HIDDEN),
        decoder_config=dict(hidden_size_global=HIDDEN),
    ),
    # X-MOD's language adapters need an input language (without one the model raises; the engine refuses it)
    "xmod": dict(default_language="en_XX"),
    # the default config leaves layer_types None, which the model indexes (real checkpoints list them)
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    # the default config leaves the QSA indexer's sizes None; the n-gram embedding's defaults are huge
    "qwen4_exp_text": dict(
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=16,
        indexer_compress_ratio=4,
        ngram_vocab_size_base=1024,
        hc_lowrank=16,
        ple_embed_dim=HIDDEN,
        split_ngram_parts=4,
    ),
}


@dataclass
class SweepResult:
    model_type: str
    outcome: str  # exact | refused | skipped | mismatch
    detail: str = ""


def _is_pattern(value: object, num_layers: int) -> bool:
    """A per-layer pattern field: one kind (str / bool / 0-1 flag) per decoder layer (layer_types, mlp_layer_types)."""
    if not isinstance(value, (list, tuple)) or num_layers < 2 or len(value) != num_layers:
        return False
    return all(isinstance(x, (str, bool)) or x in (0, 1) for x in value)


def _shrink_layers(default: dict, num_layers_key: str, shrunk: dict) -> dict:
    """The shrunk per-layer fields: a few layers that keep each distinct combination of the per-layer patterns (in
    order of first appearance), those patterns taken at these layers, and `per_layer_config` (per-layer overrides
    of the global sizes) remapped to them with each size scaled like its global one."""
    num_layers = int(default.get(num_layers_key) or 0)
    patterns = {k: list(v) for k, v in default.items() if _is_pattern(v, num_layers)}
    if not patterns:
        return {}
    first: dict[tuple, int] = {}
    for j in range(num_layers):
        first.setdefault(tuple(p[j] for p in patterns.values()), j)
    layers = sorted(first.values())[:6]
    if len(layers) == 1:
        layers.append(1)  # two layers of the one kind
    out: dict = {k: [p[j] for j in layers] for k, p in patterns.items()}
    out[num_layers_key] = len(layers)
    per_layer = default.get("per_layer_config")
    if isinstance(per_layer, dict) and per_layer:
        entries = {int(k): v for k, v in per_layer.items()}
        out["per_layer_config"] = {
            i: {k: _scaled(v, default.get(k), shrunk.get(k)) for k, v in entries[j].items()}
            for i, j in enumerate(layers)
            if j in entries
        }
    return out


def _scaled(value: object, global_value: object, shrunk_global: object) -> object:
    """A per-layer size next to its shrunk global: the same ratio to it (head_dim 512 beside 256 -> 2x the shrink)."""
    if all(isinstance(x, int) and not isinstance(x, bool) for x in (value, global_value, shrunk_global)):
        return max(1, round(shrunk_global * value / global_value)) if global_value else value
    return value


def _shrink_sizes(config: PretrainedConfig, vocab_size: int) -> dict:
    """The generic shrink of one config: the SHRINK sizes it has, its layer patterns, its vocabulary sizes."""
    default = config.to_dict()  # the fields (not derived properties); per-layer attributes at their global value
    attr_map = getattr(type(config), "attribute_map", {}) or {}
    overrides: dict = {}
    for key, value in SHRINK.items():
        actual = attr_map.get(key, key)
        if actual in default and actual not in overrides and (key in NONE_MEANS_UNSET or default[actual] is not None):
            overrides[actual] = value
    head_dim_key = attr_map.get("head_dim", "head_dim")
    if "qk_rope_head_dim" in default and head_dim_key in overrides:
        overrides[head_dim_key] = SHRINK["qk_rope_head_dim"]  # MLA: head_dim is the rope part
    kv_key = attr_map.get("num_key_value_heads", "num_key_value_heads")
    if "kv_lora_rank" in default and kv_key in overrides:
        overrides[kv_key] = HEADS  # MLA expands the latent to every query head
    if "sliding_window" in overrides and not isinstance(default["sliding_window"], int):
        del overrides["sliding_window"]
    overrides.update(_shrink_layers(default, attr_map.get("num_hidden_layers", "num_hidden_layers"), overrides))
    vocab_key = attr_map.get("vocab_size", "vocab_size")
    for key in (vocab_key, "vocab_size_per_layer_input", "unpadded_vocab_size"):  # sizes of the tokenizer's vocabulary
        if key in default:
            overrides[key] = vocab_size
    return overrides


def _merged(base: dict, extra: dict) -> dict:
    """`base` updated with `extra`, dict values (sub-configs) merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def shrink_overrides(model_type: str, vocab_size: int, special: dict) -> dict:
    """Constructor kwargs that shrink `model_type`'s default config (only keys it has). A language model's
    sub-configs (a byte-latent model's encoder / decoder, an image-to-text model's vision tower) are shrunk too."""
    try:
        config = AutoConfig.for_model(model_type)
    except Exception:  # a default config that fails its own validation: with the fixes of OVERRIDES
        config = AutoConfig.for_model(model_type, **OVERRIDES.get(model_type, {}))
    default = config.to_dict()
    overrides = _shrink_sizes(config, vocab_size)
    overrides[getattr(type(config), "attribute_map", {}).get("vocab_size", "vocab_size")] = vocab_size
    if _is_language_model(config):
        for name, sub in vars(config).items():
            if isinstance(sub, PretrainedConfig):
                overrides[name] = _shrink_sizes(sub, vocab_size)
    if "is_decoder" in default:  # encoder families (BERT, RoBERTa...) generate causally as decoders
        overrides["is_decoder"] = True
    overrides.update({k: v for k, v in special.items() if k in default or k.endswith("token_id")})
    return _merged(overrides, OVERRIDES.get(model_type, {}))


def _is_language_model(config: PretrainedConfig) -> bool:
    """False for a composite (multimodal) config: its text config is a sub-config."""
    try:
        return config.get_text_config() is config
    except ValueError:  # several text configs (MusicGen's text encoder and decoder)
        return False


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
    if not _is_language_model(config):
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
    """The verdict on one architecture. A model HF cannot generate with is still given to the engine: refused at
    load, it is a verdict (the engine never answers for it); accepted, there is no reference, so it is skipped."""
    try:
        config, built = build_sweep_model(model_type, path)
    except Exception as e:
        return SweepResult(model_type, "skipped", f"HF fails to build the shrunk model: {type(e).__name__}: {e}")
    if not built and is_image_text_config(config):
        return SweepResult(model_type, "skipped", "an image-text-to-text model: tests/models/test_vlm.py covers those")
    expected, hf_error = None, ""
    if built:
        try:
            expected = hf_greedy(path, SWEEP_PROMPTS, N_NEW)
        except Exception as e:
            hf_error = f"HF fails to generate: {type(e).__name__}: {e}"
    try:
        engine = Engine(str(path), model_impl="transformers", dtype="float32", device="cpu", kv_cache_memory_gb=0.05)
    except UnsupportedModelError as e:
        return SweepResult(model_type, "refused", str(e) + (f" [{hf_error[:200]}]" if hf_error else ""))
    with engine:
        if hf_error:
            return SweepResult(model_type, "skipped", f"{hf_error} (the engine accepts it: no reference to compare)")
        if expected is None:
            return SweepResult(model_type, "mismatch", "the engine accepted a multimodal config")
        params = SamplingParams(max_new_tokens=N_NEW, temperature=0.0, ignore_eos=True)
        got = [o.token_ids for o in engine.generate(SWEEP_PROMPTS, params)]
    if got != expected:
        return SweepResult(model_type, "mismatch", f"engine {got} != HF {expected}")
    return SweepResult(model_type, "exact")


def write_report(results: dict[str, SweepResult], file: Path) -> None:
    file.write_text(json.dumps({k: [r.outcome, r.detail] for k, r in sorted(results.items())}, indent=1))
