"""Memory needed to serve a model (weights + KV cache), estimated without downloading any weights.

Hub ids: tensor names, dtypes and shapes from the safetensors headers (`get_safetensors_metadata`, HTTP
range requests) and config.json. Local folders: the same read from the files' headers (no tensor data).

Quantization strings are parsed by the engine's own parser (backend.quantization.resolve_quantization), so the
estimate accepts exactly what Engine accepts ("int4:g64,kernel=torch", a checkpoint's own "gptq"...). Rules
(matching backend/quantization): every 2-D floating `*.weight` of a linear layer the method does not skip
(lm_head by default) is quantized; token/position embeddings stay unquantized, as do norms and biases.
int8: 1 byte/param + one scale per output channel; int4: 0.5 byte/param + a scale and a zero point per group
(backend/quantization/int4.py's group rule); fp8: 1 byte/param + one float32 scale per output channel.
Scales take the activation dtype. "auto" keeps each tensor's checkpoint dtype; another dtype casts the
floating tensors only. Pre-quantized checkpoints: their stored bytes are counted.

MoE experts (tensors under an `experts.` module: per-expert 2-D weights or stacked 3-D ones) are quantized like
linears in the steady state, but only once a layer's experts have loaded (backend/quantization/experts.py), so
`load_peak_bytes` holds one layer's experts (the largest) at full precision beside the quantized rest; for a
checkpoint of per-expert tensors that only transformers' converter reads (no native implementation, and a
conversion backend/loading/conversions.py does not stream), every weight: all at full precision first.
`peak_bytes` (what the host's memory check compares) is the larger of that and weights + KV cache.

KV cache: bytes per token from backend.core.kv_cache.KVCacheSpec (the engine's own). With `engine=EngineKVSettings(...)`
the cache and context are the ones the engine will get with those settings (backend/core/kv_sizing.py); without,
the cache for `num_seqs` x `context_len` tokens.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub as hf
import torch
from huggingface_hub.errors import (
    NotASafetensorsRepoError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    SafetensorsParsingError,
)

from backend.core.config import DTYPES, EngineConfig
from backend.core.errors import ModelNotFoundError, UnsupportedModelError
from backend.core.kv_cache import KVCacheSpec, KVSlot
from backend.core.kv_sizing import model_context_len, plan_kv_cache
from backend.loading.builtin import find_builtin, resolve_builtin
from backend.loading.conversions import streams_experts
from backend.loading.hub_common import (
    FLOAT_DTYPES,
    GGUF_MESSAGE,
    SAFETENSORS_DTYPE_BYTES,
    _TransportError,
    check_local_folder,
    hub_cache_dir,
    hub_errors,
    is_gguf_name,
    local_path,
    no_safetensors_error,
    offline_mode_enabled,
    safetensors_files,
)
from backend.models import NATIVE_MODELS
from backend.quantization import resolve_quantization
from backend.quantization.experts import STACKED_WEIGHTS
from backend.quantization.int4 import effective_group_size
from backend.units import format_bytes, format_count

KV_DTYPES_BY_BYTES: dict[int, torch.dtype] = {4: torch.float32, 2: torch.bfloat16, 1: torch.float8_e4m3fn}
ON_THE_FLY = ("int8", "int4", "fp8")  # methods whose bytes are computed here (checkpoint formats: as stored)
UNQUANTIZED_NAME_PARTS = ("embed", "wte", "wpe", "shared", "word_embeddings")  # the output head: `_is_head`
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")  # per-expert checkpoint tensors
# Tensor names of an image-text model's vision tower and projector (the rest: its language model)
VISION_NAME_PARTS = ("vision", "visual", "multi_modal_projector", "mm_projector", "connector.", "image_newline")


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # safetensors dtype string: "BF16", "F32", "I8" ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return math.ceil(self.numel * SAFETENSORS_DTYPE_BYTES.get(self.dtype, 1))


@dataclass(frozen=True)
class EngineKVSettings:
    """The engine options that size its KV cache (EngineConfig's names and defaults)."""

    block_size: int = EngineConfig.default("block_size")
    kv_cache_memory_gb: float | None = EngineConfig.default("kv_cache_memory_gb")
    num_kv_blocks: int | None = EngineConfig.default("num_kv_blocks")
    max_model_len: int | None = EngineConfig.default("max_model_len")
    device: str = EngineConfig.default("device")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    weight_bytes: int
    kv_cache_bytes: int
    total_bytes: int
    dtype: str  # the weights' dtype as estimated: "bfloat16", or "auto (BF16)" for the checkpoint's own
    notes: tuple[str, ...] = ()
    quantization: str | None = None
    context_len: int = 0
    num_seqs: int = 0
    kv_bytes_per_token: int = 0
    kv_blocks: int | None = None  # with engine settings: the blocks the engine will allocate
    block_size: int | None = None
    model_context_len: int = 0  # the model's own context (config)
    load_peak_bytes: int = 0  # weights in memory at the worst moment of loading (MoE experts before quantizing)
    vision_bytes: int = 0  # of weight_bytes, an image-text model's vision tower and projector

    @property
    def peak_bytes(self) -> int:
        """The most memory the model needs at any moment: while loading, or serving (weights + KV cache)."""
        return max(self.total_bytes, self.load_peak_bytes)

    @property
    def human(self) -> str:
        quant = f", {self.quantization}" if self.quantization else ""
        text = (
            f"{format_bytes(self.total_bytes)} total: weights {format_bytes(self.weight_bytes)} "
            f"({format_count(self.params)} params, {self.dtype}{quant}) + KV cache "
            f"{format_bytes(self.kv_cache_bytes)} ({self.num_seqs} x {self.context_len} tokens)"
        )
        if self.load_peak_bytes > self.total_bytes:
            text += f"; {format_bytes(self.load_peak_bytes)} at the peak of loading (MoE experts before quantizing)"
        return text

    def __str__(self) -> str:
        return self.human


# ---------------------------------------------------------------------------------------- sources


def read_safetensors_header(path: Path) -> dict[str, TensorMeta]:
    """Tensor metadata from one file's header (8-byte little-endian length + JSON); no tensor data read."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UnsupportedModelError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise UnsupportedModelError(f"{path} is not a safetensors file (header of {length} bytes)")
        header = json.loads(f.read(length))
    return {
        name: TensorMeta(name, info["dtype"], tuple(info["shape"]))
        for name, info in header.items()
        if name != "__metadata__"
    }


def _local_sources(folder: Path) -> tuple[dict, list[TensorMeta]]:
    check_local_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    tensors: dict[str, TensorMeta] = {}
    for file in safetensors_files(folder):
        tensors.update(read_safetensors_header(file))
    return config, list(tensors.values())


def _hub_sources(repo_id: str, revision: str | None, token: str | None) -> tuple[dict, list[TensorMeta]]:
    api = hf.HfApi(token=token)
    with hub_errors(repo_id, revision):
        try:
            meta = api.get_safetensors_metadata(repo_id, revision=revision)
        except NotASafetensorsRepoError:
            files = api.list_repo_files(repo_id, revision=revision)
            raise no_safetensors_error(f"the repository {repo_id}", list(files)) from None
        except SafetensorsParsingError as e:
            raise UnsupportedModelError(f"cannot read the safetensors headers of {repo_id}: {e}") from e
        try:
            config_path = hf.hf_hub_download(
                repo_id, "config.json", revision=revision, token=token, cache_dir=hub_cache_dir()
            )
        except RemoteEntryNotFoundError:
            raise UnsupportedModelError(
                f"{repo_id} has no config.json, so it is not a transformers checkpoint this engine can load; "
                "pick the original (transformers) repository of the model"
            ) from None
    config = json.loads(Path(config_path).read_text())
    tensors = {
        name: TensorMeta(name, info.dtype, tuple(info.shape))
        for file_meta in meta.files_metadata.values()
        for name, info in file_meta.tensors.items()
    }
    return config, list(tensors.values())


def _cached_sources(repo_id: str, revision: str | None, token: str | None) -> tuple[dict, list[TensorMeta]]:
    """Offline: the cached snapshot, found exactly as resolve_model finds it (no network)."""
    from backend.loading.hub import resolve_model

    return _local_sources(resolve_model(repo_id, revision=revision, token=token, offline=True))


# ------------------------------------------------------------------------------------- estimation


def estimate_memory(
    name_or_path: str,
    dtype: str = "auto",
    quantization: str | None = None,
    context_len: int = 4096,
    num_seqs: int = 1,
    kv_dtype_bytes: int | None = None,
    *,
    engine: EngineKVSettings | None = None,
    revision: str | None = None,
    token: str | None = None,
    allow_local_paths: bool = True,
) -> MemoryEstimate:
    """Weights + KV cache bytes for serving `name_or_path` (a built-in name, a folder or a Hub id), from headers
    and config only (a built-in model not built yet is built first, as Engine would). `allow_local_paths=False`:
    `name_or_path` is a Hub id (or a built-in name) even where a folder of that spelling exists (hosting).

    Without `engine`: KV cache for `num_seqs` sequences of `context_len` tokens. With `engine`: the cache and
    context the engine will allocate with those settings (KVCacheError when they cannot work). KV bytes per
    token: `kv_dtype_bytes` per element, else the activation dtype. Activations, the CUDA context and allocator
    slack are not included.
    """
    dtype_name = _check_dtype(dtype)
    if context_len < 1 or num_seqs < 1:
        raise ValueError(f"context_len and num_seqs must be >= 1, got {context_len} and {num_seqs}")
    if kv_dtype_bytes is not None and kv_dtype_bytes not in KV_DTYPES_BY_BYTES:
        raise ValueError(f"kv_dtype_bytes must be one of {sorted(KV_DTYPES_BY_BYTES)}, got {kv_dtype_bytes}")
    name_or_path = str(name_or_path).strip()
    builtin = find_builtin(name_or_path)
    if builtin is not None:
        if builtin.hub_id is None or offline_mode_enabled():
            name_or_path = str(resolve_builtin(builtin.name))
        else:
            name_or_path = builtin.hub_id  # online: the Hub original (falls back to the cache below)
    if is_gguf_name(name_or_path):
        raise UnsupportedModelError(f"{name_or_path}: {GGUF_MESSAGE}")
    folder = local_path(name_or_path) if allow_local_paths or builtin is not None else None
    if folder is not None:
        config, tensors = _local_sources(folder)
    elif offline_mode_enabled():
        config, tensors = _cached_sources(name_or_path, revision, token)
    else:
        try:
            config, tensors = _hub_sources(name_or_path, revision, token)
        except ModelNotFoundError as e:
            if not isinstance(e.__cause__, (_TransportError, OfflineModeIsEnabled)):
                raise
            try:  # the Hub is unreachable: a cached snapshot will do
                config, tensors = _cached_sources(name_or_path, revision, token)
            except ModelNotFoundError:
                if builtin is None:
                    raise e from e.__cause__
                config, tensors = _local_sources(resolve_builtin(builtin.name))
    if not tensors:
        raise UnsupportedModelError(f"{name_or_path}: its safetensors files hold no tensors")
    return compute_estimate(
        config, tensors, dtype_name, quantization, None, context_len, num_seqs, kv_dtype_bytes, engine=engine
    )


def compute_estimate(
    config: dict,
    tensors: list[TensorMeta],
    dtype: str = "auto",
    quantization: str | None = None,
    group_size: int | None = None,
    context_len: int = 4096,
    num_seqs: int = 1,
    kv_dtype_bytes: int | None = None,
    *,
    engine: EngineKVSettings | None = None,
) -> MemoryEstimate:
    """The estimate from a config dict and the tensors' metadata. `group_size` overrides an int4 request's."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    notes: list[str] = []
    act_bytes = _dtype_bytes(dtype) if dtype != "auto" else _auto_activation_bytes(config, text, tensors)
    method = resolve_quantization(quantization, config, group_size) if quantization is not None else None
    if quantization is not None and method is not None and not method.on_the_fly:
        notes.append(f"{method.describe()}: the checkpoint's quantized weights are counted as stored")
    on_the_fly = method if method is not None and method.on_the_fly and method.name in ON_THE_FLY else None
    quant_label = method.name if on_the_fly is not None else None
    weight_bytes, quantized, experts_quantized, vision_bytes = 0, 0, 0, 0
    layer_extra: dict[str, int] = {}  # experts module -> its bytes at full precision beyond its quantized bytes
    image_text = isinstance(config.get("vision_config"), dict)

    def as_loaded(t: TensorMeta) -> int:  # its bytes unquantized
        return t.nbytes if dtype == "auto" or t.dtype not in FLOAT_DTYPES else t.numel * act_bytes

    already_quantized = any(t.dtype not in FLOAT_DTYPES for t in tensors if t.name.endswith("weight"))
    for t in tensors:
        if on_the_fly is not None and _quantizable(t, on_the_fly):
            size = _quantized_bytes(t, on_the_fly, act_bytes)
            quantized += 1
            if _is_expert(t):
                experts_quantized += size
                module = t.name.partition(".experts.")[0]
                layer_extra[module] = layer_extra.get(module, 0) + as_loaded(t) - size
        else:
            size = as_loaded(t)
        weight_bytes += size
        if image_text and _is_vision(t):
            vision_bytes += size
    tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    if on_the_fly is not None and _head_format(on_the_fly) is not None and tied and not any(map(_is_head, tensors)):
        # a tied lm_head quantized from the embedding, which stays: the quantized copy is extra
        embedding = next((t for t in tensors if "embed_tokens" in t.name and len(t.shape) == 2), None)
        if embedding is not None:
            weight_bytes += _quantized_bytes(
                TensorMeta("lm_head.weight", embedding.dtype, embedding.shape), on_the_fly, act_bytes
            )
            quantized += 1
    load_peak = weight_bytes
    if layer_extra:
        per_expert_names = any(_PER_EXPERT.search(t.name) for t in tensors)
        converted = _architecture(config) not in NATIVE_MODELS and not streams_experts(text.get("model_type"))
        if per_expert_names and converted:
            load_peak = sum(as_loaded(t) for t in tensors)  # transformers' converter: all at full precision first
        else:  # quantized as each layer's experts stream in: one layer's experts at full precision at a time
            load_peak = weight_bytes + max(layer_extra.values())
        notes.append(
            f"MoE experts are quantized once they have loaded: the peak while loading is about "
            f"{format_bytes(load_peak)}"
        )
    if on_the_fly is not None:
        notes.append(
            f"{on_the_fly.describe()}: {quantized} linear weights quantized"
            + (f" (MoE experts among them, {format_bytes(experts_quantized)})" if experts_quantized else "")
            + "; embeddings, "
            f"{', '.join(on_the_fly.ignore) or 'no other module'}, norms and biases stay at the activation dtype"
        )
        if already_quantized:
            notes.append(
                "the checkpoint already holds non-float weights (a quantized checkpoint): those are counted as stored"
            )
    if image_text:
        notes.append(
            f"the vision tower and projector: {format_bytes(vision_bytes)} of the weights (counted; run once per "
            "image, at its request's first prefill step)"
        )
    if dtype == "auto":
        stored = sorted({t.dtype for t in tensors})
        dtype_label = f"auto ({'/'.join(stored)})"
        notes.append("auto keeps each tensor's checkpoint dtype")
    else:
        dtype_label = dtype
    if "quantization_config" in config or "quantization_config" in text:
        notes.append("checkpoint is pre-quantized: parameter counts are of stored (packed) elements")

    kv_dtype = KV_DTYPES_BY_BYTES[kv_dtype_bytes or act_bytes]
    block_size = engine.block_size if engine is not None else 16
    spec, kv_notes = kv_spec_from_config(text, kv_dtype, block_size)
    notes.extend(kv_notes)
    kv_per_token = spec.bytes_per_token() if spec is not None else 0
    model_len = model_context_len(text)
    kv_blocks = None
    if engine is not None and spec is not None:
        plan = plan_kv_cache(
            spec, model_len, engine.torch_device, engine.kv_cache_memory_gb, engine.num_kv_blocks, engine.max_model_len
        )
        context_len, num_seqs, kv_bytes, kv_blocks = (
            plan.max_model_len,
            plan.full_sequences,
            plan.cache_bytes,
            plan.num_blocks,
        )
        notes.append(
            f"the engine will hold {plan.num_blocks:,} blocks of {plan.block_size} tokens ({plan.tokens:,} tokens, "
            f"{format_bytes(plan.cache_bytes)}): context {plan.max_model_len:,} tokens"
            + (f" of the model's {model_len:,}" if plan.max_model_len < model_len else "")
            + f", {plan.full_sequences} full-length sequence(s) at once"
        )
    else:
        kv_bytes = kv_per_token * context_len * num_seqs
    notes.append("not included: activations, CUDA context and allocator overhead (often 0.5-2 GiB more)")
    params = sum(t.numel for t in tensors)
    return MemoryEstimate(
        params,
        int(weight_bytes),
        int(kv_bytes),
        int(weight_bytes + kv_bytes),
        dtype_label,
        tuple(notes),
        quant_label,
        context_len,
        num_seqs,
        int(kv_per_token),
        kv_blocks,
        block_size if engine is not None else None,
        model_len,
        int(load_peak),
        int(vision_bytes),
    )


def _dtype_bytes(dtype: str) -> int:
    return torch.tensor([], dtype=DTYPES[dtype]).element_size()


def _check_dtype(dtype: str) -> str:
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use 'auto' or one of {', '.join(DTYPES)}")
    return dtype


def _auto_activation_bytes(config: dict, text: dict, tensors: list[TensorMeta]) -> int:
    for cfg in (text, config):
        name = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(name, str) and name in DTYPES:
            return _dtype_bytes(name)
    counts: dict[str, int] = {}
    for t in tensors:
        if t.dtype in ("F32", "F16", "BF16"):
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
    return int(SAFETENSORS_DTYPE_BYTES[max(counts, key=counts.get)]) if counts else 4


def _is_vision(t: TensorMeta) -> bool:
    return any(part in t.name for part in VISION_NAME_PARTS)


def _is_expert(t: TensorMeta) -> bool:
    return ".experts." in t.name


def _architecture(config: dict) -> str | None:
    archs = config.get("architectures") or []
    return archs[0] if archs else None


def _head_format(method) -> str | None:
    """The output projection's quantized format when an on-the-fly request's `lm_head=` asks for one, else None."""
    head = getattr(method.config, "lm_head", "none")
    return None if head == "none" else head


def _is_head(t: TensorMeta) -> bool:
    lowered = t.name.lower()
    return "lm_head" in lowered or lowered == "output.weight"


def _quantizable(t: TensorMeta, method) -> bool:
    if len(t.shape) == 3 and t.dtype in FLOAT_DTYPES and _is_expert(t) and t.name.rpartition(".")[2] in STACKED_WEIGHTS:
        return not method.skip(t.name.rpartition(".")[0])  # stacked experts (E, N, K): quantized per expert
    if len(t.shape) != 2 or t.dtype not in FLOAT_DTYPES or not t.name.endswith(".weight"):
        return False
    if _is_head(t):
        return _head_format(method) is not None  # full precision unless `lm_head=` says otherwise
    prefix = t.name.removesuffix(".weight")
    lowered = t.name.lower()
    if any(part in lowered for part in UNQUANTIZED_NAME_PARTS):
        return False  # embeddings (not linear layers)
    return not method.skip(prefix) and not method.skip(prefix.removeprefix("model."))


def _quantized_bytes(t: TensorMeta, method, scale_bytes: int) -> int:
    if len(t.shape) == 3:  # stacked experts: one (N, K) weight per expert
        experts, n, k = t.shape
        return experts * _quantized_bytes(TensorMeta(t.name, t.dtype, (n, k)), method, scale_bytes)
    n, k = t.shape  # (out_features, in_features)
    if method.name == "int8" or (_is_head(t) and _head_format(method) == "int8"):
        return n * k + n * scale_bytes
    if method.name == "fp8":
        return n * k + n * 4
    groups = -(-k // effective_group_size(k, method.config.group_size))
    return -(-n * k // 2) + 2 * n * groups * scale_bytes  # packed codes + scales + zero points


def _first_int(cfg: dict, *keys: str) -> int | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def kv_spec_from_config(cfg: dict, dtype: torch.dtype, block_size: int = 16) -> tuple[KVCacheSpec | None, list[str]]:
    """The KV cache layout the config describes (one slot per attention layer), and notes on the assumptions;
    None when the config names no layer or head count. Bytes per token: the spec's `bytes_per_token()`, the
    engine's own (which reads the layout from the loaded model; this reads it from config.json)."""
    notes: list[str] = []
    layers = _first_int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = _first_int(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
    if layers is None or heads is None:
        return None, ["KV cache unknown: config.json names no layer or head count"]
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        attention = [t for t in layer_types if "attention" in str(t) and "linear" not in str(t)]
        if len(attention) != len(layer_types):
            notes.append(f"{len(attention)} of {len(layer_types)} layers use attention (only those hold KV)")
        layers = len(attention)
        if any("sliding" in str(t) for t in attention):
            notes.append("sliding-window layers counted at the full context (the paged cache keeps every token)")
    kv_heads = _first_int(cfg, "num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
    if kv_heads is None:
        kv_heads = 1 if cfg.get("multi_query") is True else heads
    hidden = _first_int(cfg, "hidden_size", "n_embd", "d_model", "dim")
    head_dim = _first_int(cfg, "head_dim")
    if head_dim is None:
        if hidden is None:
            return None, ["KV cache unknown: config.json gives neither head_dim nor hidden_size"]
        head_dim = hidden // heads
    k_dim = v_dim = head_dim
    if _first_int(cfg, "kv_lora_rank") is not None:  # MLA (DeepSeek): K/V expanded per head
        k_dim = (_first_int(cfg, "qk_nope_head_dim") or 0) + (_first_int(cfg, "qk_rope_head_dim") or 0) or head_dim
        v_dim = _first_int(cfg, "v_head_dim") or head_dim
        kv_heads = heads
        notes.append("MLA model: KV counted as expanded per-head K and V")
    elem = torch.tensor([], dtype=dtype).element_size()
    notes.append(
        f"KV cache: 2 x {layers} layers x {kv_heads} kv heads x {head_dim} head_dim x {elem} bytes per token"
        if k_dim == v_dim == head_dim
        else f"KV cache: {layers} layers x {kv_heads} kv heads x ({k_dim} + {v_dim}) x {elem} bytes per token"
    )
    spec = KVCacheSpec(tuple(KVSlot(i, kv_heads, k_dim, v_dim) for i in range(layers)), dtype, block_size)
    return spec, notes
