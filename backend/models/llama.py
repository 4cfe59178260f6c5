"""The shared native decoder core (Llama and the families that differ only by options), plus Llama and Mistral.

One flat row of tokens per step: `input_ids (T,)`, `positions (T,)`, the step's metadata in `ForwardBatch`.
Fused projections (`qkv_proj`, `gate_up_proj`) are plain `nn.Linear` (the quantization layer swaps them
before the weights load); attention is the shared `PagedAttention`; norms, rotary and activations come
from backend/layers. Family files (qwen.py, gemma.py, phi3.py, moe.py) only change options or the MLP.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from backend.core.forward_batch import ForwardBatch
from backend.layers.activation import act_and_mul
from backend.layers.attention import PagedAttention
from backend.layers.cpu.decode_stack import CpuDecodeStack, DecodeLayerParts, build_decode_stack
from backend.layers.norm import RMSNorm
from backend.layers.rotary import RopeStep, RotaryEmbedding
from backend.models.options import ModelOptions, options_from_config, uniform_windows
from backend.models.weights import LLAMA_STACKED, NativeWeightLoader, build_buffers


class Attention(nn.Module):
    def __init__(self, opts: ModelOptions, layer_idx: int) -> None:
        super().__init__()
        self.q_size, self.kv_size, self.head_dim = opts.q_size, opts.kv_size, opts.head_dim
        self.fused_shards = {"qkv_proj": [opts.q_size, opts.kv_size, opts.kv_size]}
        self.qkv_proj = nn.Linear(opts.hidden_size, opts.q_size + 2 * opts.kv_size, bias=opts.qkv_bias)
        self.o_proj = nn.Linear(opts.q_size, opts.hidden_size, bias=opts.o_bias)
        self.q_norm = RMSNorm(opts.head_dim, opts.rms_norm_eps) if opts.qk_norm else None
        self.k_norm = RMSNorm(opts.head_dim, opts.rms_norm_eps) if opts.qk_norm else None
        window = opts.sliding_windows[layer_idx] if opts.sliding_windows else None
        self.attn = PagedAttention(
            opts.num_heads,
            opts.num_kv_heads,
            opts.head_dim,
            layer_idx,
            scale=opts.attn_scale,
            softcap=opts.attn_softcap,
            sliding_window=window,
        )

    def forward(self, rope: RopeStep, x: torch.Tensor, batch: ForwardBatch, rotary: RotaryEmbedding) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, Hq*D + 2*Hkv*D)
        if self.q_norm is None:
            qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
            q, k = rotary.rotate_qk(rope, qk, self.q_size)  # (T, Hq*D), (T, Hkv*D)
        else:  # per-head RMSNorm over D, then rotary
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self.q_norm(q.reshape(t, -1, self.head_dim)).view(t, self.q_size)
            k = self.k_norm(k.reshape(t, -1, self.head_dim)).view(t, self.kv_size)
            q, k = rotary(rope, q, k)  # (T, Hq*D), (T, Hkv*D)
        return self.o_proj(self.attn(q, k, v, batch))  # (T, H)


class MLP(nn.Module):
    def __init__(self, opts: ModelOptions, intermediate_size: int | None = None) -> None:
        super().__init__()
        inter = intermediate_size or opts.intermediate_size
        self.act = opts.act
        self.fused_shards = {"gate_up_proj": [inter, inter]}
        self.gate_up_proj = nn.Linear(opts.hidden_size, 2 * inter, bias=opts.mlp_bias)
        self.down_proj = nn.Linear(inter, opts.hidden_size, bias=opts.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act))  # (T, 2I) -> (T, I) -> (T, H)


MlpFactory = Callable[[ModelOptions, int], nn.Module]


class DecoderLayer(nn.Module):
    def __init__(self, opts: ModelOptions, layer_idx: int, make_mlp: MlpFactory) -> None:
        super().__init__()
        norm = lambda: RMSNorm(opts.hidden_size, opts.rms_norm_eps, opts.norm_offset)  # noqa: E731
        self.self_attn = Attention(opts, layer_idx)
        self.mlp = make_mlp(opts, layer_idx)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich = opts.sandwich_norm
        if self.sandwich:  # Gemma2: norm the block outputs too, before the residual add
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(
        self,
        rope: RopeStep,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        rotary: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # the true hidden state is h + residual (the add is fused into the next norm)
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(rope, h, batch, rotary)
        if self.sandwich:
            h = self.post_attention_layernorm(h)
            h, residual = self.pre_feedforward_layernorm(h, residual)
            h = self.post_feedforward_layernorm(self.mlp(h))
        else:
            h, residual = self.post_attention_layernorm(h, residual)
            h = self.mlp(h)
        return h, residual

    def decode_parts(self) -> DecodeLayerParts | None:
        """This layer for the C++ decode stack (backend/layers/cpu/decode_stack.py): the plain shape only (no
        sandwich norms, a gated dense MLP)."""
        if self.sandwich or type(self.mlp) is not MLP:
            return None
        attn, mlp = self.self_attn, self.mlp
        return DecodeLayerParts(
            self.input_layernorm,
            self.post_attention_layernorm,
            attn.q_norm,
            attn.k_norm,
            attn.qkv_proj,
            attn.o_proj,
            mlp.gate_up_proj,
            mlp.down_proj,
            mlp.act,
            attn.attn,
        )


class DecoderModel(nn.Module):
    """Mirrors HF's `model.` subtree so checkpoint names map one to one (after fusing)."""

    def __init__(self, config: PretrainedConfig, opts: ModelOptions, make_mlp: MlpFactory, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(opts.vocab_size, opts.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(opts, i, make_mlp) for i in range(opts.num_layers))
        self.norm = RMSNorm(opts.hidden_size, opts.rms_norm_eps, opts.norm_offset)
        self.rotary_emb = RotaryEmbedding(config, opts.head_dim, opts.max_position)
        self.cpu_decode: CpuDecodeStack | None = None  # decode steps in one C++ call (use_cpu_decode_stack)
        # HF multiplies by torch.tensor(scale) cast to the weight dtype: round the same way
        self.embed_scale = (
            None
            if opts.embed_scale is None
            else float(torch.tensor(opts.embed_scale, dtype=torch.float32, device="cpu").to(dtype))
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # (T, H)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        residual = None
        rope = self.rotary_emb.prepare(positions, batch.seq_lens, batch.query_start_loc, h.dtype)
        stacked = None if self.cpu_decode is None else self.cpu_decode(h, rope, batch)
        if stacked is not None:
            h, residual = stacked
        else:
            for layer in self.layers:
                h, residual = layer(rope, h, residual, batch, self.rotary_emb)
        h, _ = self.norm(h, residual)
        return h  # (T, H)

    def use_cpu_decode_stack(self, ext: ModuleType) -> bool:
        """Decode steps through every layer in one call of our C++ kernels, when every layer is the plain shape
        on them and the rotary runs our kernel (after backend/layers/cpu/fused.py's swaps)."""
        parts = [layer.decode_parts() for layer in self.layers]
        if self.rotary_emb.cpu_kernel is None or any(p is None for p in parts):
            return False
        self.cpu_decode = build_decode_stack(ext, parts, list(self.layers.modules()))
        return self.cpu_decode is not None


class LlamaForCausalLM(nn.Module):
    """The native model contract: built on meta, `load_checkpoint`, `forward(batch) -> logits (R, V)`."""

    impl = "native"
    stacked_params = LLAMA_STACKED

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.options = self.make_options(config)
        self.tie_word_embeddings = self.options.tie_word_embeddings
        self.model = DecoderModel(config, self.options, self.make_mlp, dtype)
        self.lm_head = nn.Linear(self.options.hidden_size, self.options.vocab_size, bias=False)

    @classmethod
    def make_options(cls, config: PretrainedConfig) -> ModelOptions:
        return options_from_config(
            config,
            qkv_bias=bool(getattr(config, "attention_bias", False)),
            o_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )

    def make_mlp(self, opts: ModelOptions, layer_idx: int) -> nn.Module:
        return MLP(opts)

    def load_checkpoint(self, path: Path, device: torch.device, dtype: torch.dtype, on_loaded=None) -> None:
        """Stream the checkpoint in (backend/models/weights.py); `on_loaded(name)` as each parameter completes."""
        NativeWeightLoader(self, device, dtype, on_loaded).load(Path(path))
        build_buffers(self, device)

    def use_cpu_decode_stack(self, ext: ModuleType) -> bool:
        return self.model.use_cpu_decode_stack(ext)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:  # -> (R, V)
        h = self.model(batch.input_ids, batch.positions, batch)  # (T, H)
        logits = self.lm_head(h[batch.logits_indices])  # (R, V)
        cap = self.options.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


class MistralForCausalLM(LlamaForCausalLM):
    """Llama math; `config.sliding_window` on every layer (read by options_from_config)."""

    @classmethod
    def make_options(cls, config: PretrainedConfig) -> ModelOptions:
        return options_from_config(config, sliding_windows=uniform_windows(config))
