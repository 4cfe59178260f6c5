"""A custom decoder written the way the SGLang "transformers fallback" page asks remote code to be:
attention goes through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` with **kwargs passed
down, and the model class sets `_supports_attention_backend = True`."""

from dataclasses import fields

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_flab import FlabTinyConfig

# transformers >= 5.2x names the output's cache `cache` (the old `past_key_values` logs a deprecation warning)
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class FlabAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.num_key_value_groups = self.heads // self.kv_heads  # read by transformers' sdpa function
        self.head_dim = config.hidden_size // self.heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, cos, sin, cache=None, **kwargs):  # <- kwargs are required
        b, s, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(b, s, -1))


class FlabLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = FlabAttention(config, layer_idx)
        self.post_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, **kwargs):
        x = x + self.attn(self.input_norm(x), cos, sin, **kwargs)
        gate, up = self.up(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.down(nn.functional.silu(gate) * up)


def rope_inv_freq(config):
    head_dim = config.hidden_size // config.num_attention_heads
    return 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


class FlabPreTrainedModel(PreTrainedModel):
    config_class = FlabTinyConfig
    base_model_prefix = "model"
    _supports_attention_backend = True
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FlabModel):  # non-persistent buffer: rebuilt when loading from the meta device
            with torch.no_grad():
                module.inv_freq.copy_(rope_inv_freq(module.config))


class FlabModel(FlabPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(FlabLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.post_init()

    def forward(self, input_ids, position_ids=None, cache=None, **kwargs):
        x = self.embed(input_ids)
        if position_ids is None:
            start = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(start, start + input_ids.shape[1], device=x.device)[None]
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, S, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache=cache, **kwargs)
        return self.norm(x)


class FlabForCausalLM(FlabPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = FlabModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        position_ids=None,
        cache=None,
        use_cache=None,
        logits_to_keep=0,
        attention_mask=None,
        past_key_values=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values  # transformers >= 5.2x calls it `cache`
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config)
        hidden = self.model(input_ids, position_ids=position_ids, cache=cache, **kwargs)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        return CausalLMOutputWithPast(logits=self.lm_head(hidden), **{CACHE_FIELD: cache})
