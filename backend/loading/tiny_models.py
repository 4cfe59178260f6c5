"""Write random-weight checkpoints of real architectures, with a real tokenizer, into a folder.

Used by the built-in `tiny:<arch>` names (builtin.py), the tests, the examples and the benchmarks. The folder
looks like a Hub snapshot (config.json, model.safetensors, tokenizer files), so it loads through the same path.
The command line is backend/tools/tiny_models.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|eos|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A paged KV cache splits memory into blocks. "
    "Continuous batching lets requests join and leave between steps. Hello world! Once upon a time, "
    "there was a small model that ran on a laptop. It counted 1 2 3 4 5 6 7 8 9 10 and said hello. "
    "Attention is all you need; transformers, tokens, layers, heads, rotary embeddings and norms. "
)

# Architecture presets: HF model_type plus the options that make a tiny but representative model.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
ARCHS: dict[str, dict] = {
    "llama": dict(model_type="llama", **_COMMON),
    "llama3": dict(
        model_type="llama",
        **_COMMON,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "mistral": dict(model_type="mistral", **_COMMON, sliding_window=8),
    "qwen2": dict(model_type="qwen2", **_COMMON),
    "qwen3": dict(model_type="qwen3", **_COMMON, head_dim=32),
    "gemma": dict(model_type="gemma", **_COMMON, head_dim=16),
    "gemma2": dict(
        model_type="gemma2",
        **_COMMON,
        head_dim=16,
        sliding_window=8,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        query_pre_attn_scalar=16,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        **_COMMON,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi3": dict(model_type="phi3", **_COMMON),
    "phi": dict(model_type="phi", **{k: v for k, v in _COMMON.items()}, partial_rotary_factor=0.5),
    "gpt_neox": dict(
        model_type="gpt_neox",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        rotary_pct=0.25,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "opt": dict(
        model_type="opt",
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        word_embed_proj_dim=64,
    ),
    "olmo": dict(model_type="olmo", **_COMMON),
    "olmo2": dict(model_type="olmo2", **_COMMON),
    "granite": dict(
        model_type="granite",
        **_COMMON,
        embedding_multiplier=2.0,
        logits_scaling=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
    ),
    "starcoder2": dict(model_type="starcoder2", **_COMMON),
    "gptj": dict(model_type="gptj", n_embd=64, n_layer=2, n_head=4, n_positions=512, rotary_dim=8),
    "cohere": dict(model_type="cohere", **_COMMON),
    "smollm3": dict(model_type="smollm3", **_COMMON),
    "mixtral": dict(model_type="mixtral", **_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        **_COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    ),
    "gpt_oss": dict(
        model_type="gpt_oss",
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # The shape of HuggingFaceTB/SmolLM2-135M (random weights), for benchmarks.
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        vocab_size=49152,
    ),
    # The shapes the GPU benchmarks use (tests/gpu_check.sh): meta-llama/Llama-3.2-1B and Qwen/Qwen3-0.6B.
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        vocab_size=128256,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        vocab_size=151936,
    ),
}


def build_tokenizer(vocab_size: int = 512, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (default: a small built-in corpus); every string round-trips."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else [CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(arch: str, tokenizer: PreTrainedTokenizerFast, **overrides) -> PretrainedConfig:
    """The transformers config of `arch` (ARCHS) with the tokenizer's special ids (and its vocab size unless set)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {sorted(ARCHS)}")
    options = dict(ARCHS[arch], **overrides)
    model_type = options.pop("model_type")
    options.setdefault("vocab_size", len(tokenizer))
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    special.update({k: options.pop(k) for k in list(special) if k in options})  # an override wins
    return AutoConfig.for_model(model_type, **special, **options)


def build_tiny_model(
    arch: str, path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, init_std: float = 0.1, **overrides
) -> Path:
    """Write a random-weight `arch` checkpoint and its tokenizer to `path`; returns the path.

    `init_std` is larger than transformers' default (0.02) so that greedy decoding of random weights
    has clear winners (no near-ties that would make token-for-token comparisons fragile)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(arch, tokenizer, **overrides)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


REMOTE_CODE_DIR = Path(__file__).resolve().parents[2] / "examples" / "remote_code_model"


def build_remote_code_model(path: str | Path, seed: int = 0, supports_attention_backend: bool = True) -> Path:
    """Write a checkpoint whose modeling code ships in the folder (auto_map), like a trust_remote_code Hub repo.

    The code is examples/remote_code_model/; with `supports_attention_backend=False` the copy has the flag
    turned off (the engine must then refuse it with a clear error)."""
    import json
    import shutil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in ("configuration_flab.py", "modeling_flab.py"):
        shutil.copy(REMOTE_CODE_DIR / name, path / name)
    if not supports_attention_backend:
        modeling = path / "modeling_flab.py"
        modeling.write_text(
            modeling.read_text().replace("_supports_attention_backend = True", "_supports_attention_backend = False")
        )
    tokenizer = build_tokenizer()
    config = {
        "model_type": "flab_tiny",
        "architectures": ["FlabForCausalLM"],
        "vocab_size": len(tokenizer),
        "auto_map": {
            "AutoConfig": "configuration_flab.FlabTinyConfig",
            "AutoModelForCausalLM": "modeling_flab.FlabForCausalLM",
        },
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    loaded = AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(loaded, trust_remote_code=True, dtype=torch.float32)
    model.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(config, indent=2))  # keep the auto_map as written
    tokenizer.save_pretrained(path)
    return path
