"""Memory needed to serve a model (weights + KV cache), estimated without downloading any weights.

Hub ids: tensor names, dtypes and shapes from the safetensors headers (`get_safetensors_metadata`, HTTP
range requests) and config.json. Local folders: the same read from the files' headers (no tensor data).

Rules (matching backend/quantization): every 2-D floating `*.weight` of a linear layer is quantized;
token/position embeddings and the output head (lm_head, embed_out, wte, wpe...) stay unquantized, as
do norms and biases. int8: 1 byte/param + one scale per output channel; int4: 0.5 byte/param + a scale
and a zero point per group of 128 input columns (or the largest of 256/128/64/32 dividing them);
fp8: 1 byte/param + one float32 scale per output channel. Scales take the activation dtype.
"auto" keeps each tensor's checkpoint dtype; another dtype casts the floating tensors only.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub as hf
from huggingface_hub.errors import (
    NotASafetensorsRepoError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    SafetensorsParsingError,
)

from backend.errors import ModelNotFoundError, QuantizationError, UnsupportedModelError
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
from backend.units import format_bytes, format_count

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "float": "float32",
    "F32": "float32",
    "BF16": "bfloat16",
    "F16": "float16",
}
QUANT_METHODS = ("int8", "int4", "fp8")
INT4_GROUP_SIZES = (32, 64, 128, 256)
UNQUANTIZED_NAME_PARTS = ("embed", "wte", "wpe", "lm_head", "shared", "word_embeddings")


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

    @property
    def human(self) -> str:
        quant = f", {self.quantization}" if self.quantization else ""
        return (
            f"{format_bytes(self.total_bytes)} total: weights {format_bytes(self.weight_bytes)} "
            f"({format_count(self.params)} params, {self.dtype}{quant}) + KV cache "
            f"{format_bytes(self.kv_cache_bytes)} ({self.num_seqs} x {self.context_len} tokens)"
        )

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
    revision: str | None = None,
    token: str | None = None,
) -> MemoryEstimate:
    """Weights + KV cache bytes for serving `name_or_path`, from headers and config only.

    KV cache = 2 (K and V) * attention layers * kv heads * head_dim * context_len * num_seqs * kv bytes
    (kv bytes: `kv_dtype_bytes`, else the activation dtype). Activations, the CUDA context and allocator
    slack are not included.
    """
    dtype_name = _check_dtype(dtype)
    quant, group_size = _parse_quantization(quantization)
    if context_len < 1 or num_seqs < 1:
        raise ValueError(f"context_len and num_seqs must be >= 1, got {context_len} and {num_seqs}")
    if kv_dtype_bytes is not None and kv_dtype_bytes <= 0:
        raise ValueError(f"kv_dtype_bytes must be positive, got {kv_dtype_bytes}")
    name_or_path = str(name_or_path).strip()
    if is_gguf_name(name_or_path):
        raise UnsupportedModelError(f"{name_or_path}: {GGUF_MESSAGE}")
    folder = local_path(name_or_path)
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
                raise e from e.__cause__
    if not tensors:
        raise UnsupportedModelError(f"{name_or_path}: its safetensors files hold no tensors")
    return compute_estimate(config, tensors, dtype_name, quant, group_size, context_len, num_seqs, kv_dtype_bytes)


def compute_estimate(
    config: dict,
    tensors: list[TensorMeta],
    dtype: str = "auto",
    quantization: str | None = None,
    group_size: int = 128,
    context_len: int = 4096,
    num_seqs: int = 1,
    kv_dtype_bytes: int | None = None,
) -> MemoryEstimate:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    notes: list[str] = []
    act_bytes = DTYPE_BYTES[dtype] if dtype != "auto" else _auto_activation_bytes(config, text, tensors)
    weight_bytes, quantized = 0, 0
    already_quantized = any(t.dtype not in FLOAT_DTYPES for t in tensors if t.name.endswith("weight"))
    for t in tensors:
        if quantization is not None and _quantizable(t):
            weight_bytes += _quantized_bytes(t, quantization, group_size, act_bytes)
            quantized += 1
        elif dtype == "auto" or t.dtype not in FLOAT_DTYPES:
            weight_bytes += t.nbytes
        else:
            weight_bytes += t.numel * DTYPE_BYTES[dtype]
    if quantization is not None:
        notes.append(
            f"{quantization}: {quantized} linear weights quantized; embeddings, lm_head, norms and "
            "biases stay at the activation dtype"
        )
        if already_quantized:
            notes.append(
                "the checkpoint already holds non-float weights (a quantized checkpoint): those are counted as stored"
            )
    if dtype == "auto":
        stored = sorted({t.dtype for t in tensors})
        dtype_label = f"auto ({'/'.join(stored)})"
        notes.append("auto keeps each tensor's checkpoint dtype")
    else:
        dtype_label = dtype
    if "quantization_config" in config or "quantization_config" in text:
        notes.append("checkpoint is pre-quantized: parameter counts are of stored (packed) elements")

    kv_per_token, kv_notes = _kv_bytes_per_token(text, kv_dtype_bytes or act_bytes)
    notes.extend(kv_notes)
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
        quantization,
        context_len,
        num_seqs,
        int(kv_per_token),
    )


def _check_dtype(dtype: str) -> str:
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name != "auto" and name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: use 'auto', 'float32', 'bfloat16' or 'float16'")
    return name


def _parse_quantization(quantization: str | None) -> tuple[str | None, int]:
    """None | "int8" | "fp8" | "int4" | "int4:g64" | "int4:group_size=64" -> (method, int4 group size)."""
    if quantization is None or quantization.lower() in ("", "none"):
        return None, 128
    method, _, option = quantization.lower().partition(":")
    if method not in QUANT_METHODS:
        raise QuantizationError(
            f"cannot estimate quantization {quantization!r}: use one of {', '.join(QUANT_METHODS)} or None "
            "(pre-quantized checkpoints: leave it None, their stored bytes are counted)"
        )
    group = 128
    if option:
        value = option.split("=", 1)[1] if "=" in option else option.lstrip("g")
        if method != "int4" or not value.isdigit() or int(value) not in INT4_GROUP_SIZES:
            raise QuantizationError(
                f"bad option in {quantization!r}: only int4 takes a group size "
                f"({', '.join(map(str, INT4_GROUP_SIZES))}), e.g. 'int4:g64'"
            )
        group = int(value)
    return method, group


def _auto_activation_bytes(config: dict, text: dict, tensors: list[TensorMeta]) -> int:
    for cfg in (text, config):
        name = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(name, str) and DTYPE_ALIASES.get(name, name) in DTYPE_BYTES:
            return DTYPE_BYTES[DTYPE_ALIASES.get(name, name)]
    counts: dict[str, int] = {}
    for t in tensors:
        if t.dtype in ("F32", "F16", "BF16"):
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
    return int(SAFETENSORS_DTYPE_BYTES[max(counts, key=counts.get)]) if counts else 4


def _quantizable(t: TensorMeta) -> bool:
    if len(t.shape) != 2 or t.dtype not in FLOAT_DTYPES or not t.name.endswith(".weight"):
        return False
    lowered = t.name.lower()
    return not any(part in lowered for part in UNQUANTIZED_NAME_PARTS) and lowered != "output.weight"


def _int4_group(in_features: int, requested: int) -> int:
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if g <= requested and in_features % g == 0:
            return g
    return in_features


def _quantized_bytes(t: TensorMeta, method: str, group_size: int, scale_bytes: int) -> int:
    n, k = t.shape  # (out_features, in_features)
    if method == "int8":
        return n * k + n * scale_bytes
    if method == "fp8":
        return n * k + n * 4
    groups = -(-k // _int4_group(k, group_size))
    return -(-n * k // 2) + 2 * n * groups * scale_bytes  # packed codes + scales + zero points


def _first_int(cfg: dict, *keys: str) -> int | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _kv_bytes_per_token(cfg: dict, kv_bytes: int) -> tuple[int, list[str]]:
    """K + V bytes one token takes across all attention layers, and notes on the assumptions."""
    notes: list[str] = []
    layers = _first_int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = _first_int(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
    if layers is None or heads is None:
        return 0, ["KV cache unknown: config.json names no layer or head count"]
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
            return 0, ["KV cache unknown: config.json gives neither head_dim nor hidden_size"]
        head_dim = hidden // heads
    k_dim = v_dim = head_dim
    if _first_int(cfg, "kv_lora_rank") is not None:  # MLA (DeepSeek): K/V expanded per head
        k_dim = (_first_int(cfg, "qk_nope_head_dim") or 0) + (_first_int(cfg, "qk_rope_head_dim") or 0) or head_dim
        v_dim = _first_int(cfg, "v_head_dim") or head_dim
        kv_heads = heads
        notes.append("MLA model: KV counted as expanded per-head K and V")
    notes.append(
        f"KV cache: 2 x {layers} layers x {kv_heads} kv heads x {head_dim} head_dim x {kv_bytes} bytes per token"
        if k_dim == v_dim == head_dim
        else f"KV cache: {layers} layers x {kv_heads} kv heads x ({k_dim} + {v_dim}) x {kv_bytes} bytes per token"
    )
    return layers * kv_heads * (k_dim + v_dim) * kv_bytes, notes
