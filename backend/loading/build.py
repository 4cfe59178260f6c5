"""From a model name to a loaded model: resolve, read config and tokenizer, build on meta, quantize, load."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

import psutil
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

import backend.paths as paths
from backend.core.config import DTYPES, EngineConfig
from backend.core.errors import EngineError, QuantizationError, UnsupportedModelError
from backend.layers.cpu.fused import FusedLinear, use_cpu_kernels
from backend.layers.cpu.packed import PackedLinear, pack_linears, packing_available
from backend.layers.cpu.packed_experts import pack_hf_experts
from backend.layers.cpu.siblings import SiblingLinear, fuse_siblings
from backend.layers.cpu.upcast import UpcastLinear, cpu_has_fast_half_matmul, half_linears, upcast_linears
from backend.loading import hub
from backend.loading.conversions import streamable
from backend.loading.processor import LoadedProcessor, load_processor
from backend.models import IMAGE_TEXT_REASON, build_model, needs_weight_conversion, select_model_impl
from backend.models.checkpoint import (
    StreamingLoader,
    checkpoint_keys,
    fetch_again,
    materialize_leftovers,
    names_match,
)
from backend.models.moe import Experts
from backend.models.vlm import is_image_text_config
from backend.units import format_bytes

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    path: Path
    hf_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase | None  # None with skip_tokenizer_init
    model: nn.Module
    impl: str
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: set[int]
    quantization: str | None
    swapped_modules: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    cpu_linear: str = "none"  # how its 16-bit linears run on CPU: "packed", "upcast" or "none" (EngineConfig)
    num_cpu_linears: int = 0  # linears swapped for PackedLinear / UpcastLinear
    processor: LoadedProcessor | None = None  # an image-text model's processor (backend/loading/processor.py)
    cpu_kernels: str = "torch"  # "fused": our C++ CPU kernels run (EngineConfig.cpu_kernels), else "torch"
    cpu_kernels_reason: str = ""  # which kernels, or why the torch path runs
    cpu_kernel_rows: int = 0  # linears run our product up to this many rows (fused.py KernelUse.max_rows)
    # the loaded C++ CPU kernels when they run: the torch attention backend's decode-only steps use them (parts.py)
    cpu_kernel_module: ModuleType | None = None

    @property
    def cpu_upcast(self) -> bool:
        """16-bit model with fp32 linear copies (a CPU without fast 16-bit math): attention math in fp32 too."""
        return self.cpu_linear == "upcast"

    @property
    def weights_bytes(self) -> int:
        return _tensor_bytes(list(self.model.parameters()) + list(self.model.buffers()))

    @property
    def decode_weight_bytes(self) -> int:
        """Bytes of weights one single-row decode step reads: all but the fp32 copies of layers/upcast.py, the plain
        tied weights that PackedLinears keep for the embedding (a decode reads their packed copy), the tensors of
        modules our kernels stand in for (FusedLinear's inner module, a sibling group's oneDNN product), and
        embedding tables no linear multiplies by (a decode reads one row)."""
        wrapped = {id(m.inner) for m in self.model.modules() if isinstance(m, FusedLinear)}
        multiplied = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Linear) and id(m) not in wrapped}
        unread: list[torch.Tensor] = []
        for m in self.model.modules():
            if id(m) in wrapped:
                continue
            if isinstance(m, UpcastLinear):
                unread += [b for b in (m.weight_t, m.bias_f32) if b is not None]
            elif isinstance(m, PackedLinear) and m.shared_weight is not None:
                unread.append(m.shared_weight)
            elif isinstance(m, FusedLinear):  # a decode reads our packed copy, not the wrapped module's tensors
                unread += [*m.inner.parameters(), *m.inner.buffers()]
            elif isinstance(m, SiblingLinear) and m.first and m.product.fused is not None:  # the same: oneDNN's
                unread.append(m.product.packed)
            elif isinstance(m, nn.Embedding) and id(m.weight) not in multiplied:
                unread.append(m.weight)
        return self.weights_bytes - _tensor_bytes(unread)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())


def _tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct tensors (one storage counted once; meta tensors none)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = id(t) if t.is_mkldnn else t.data_ptr()  # packed (mkldnn) tensors have no data pointer
        if key in seen or t.is_meta:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tiktoken.model",
)


def load_hf_config(path: Path, trust_remote_code: bool) -> PretrainedConfig:
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            parsed = json.loads(config_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UnsupportedModelError(f"{config_file} is not valid JSON ({e}); {fetch_again(config_file)}") from None
        if not isinstance(parsed, dict):
            raise UnsupportedModelError(f"{config_file} must hold a JSON object; {fetch_again(config_file)}")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UnsupportedModelError(f"{path.name} needs custom code: pass trust_remote_code=True to run it") from e
        raise UnsupportedModelError(f"cannot read the config of {path}: {e}") from e
    except OSError as e:
        raise UnsupportedModelError(f"cannot read {config_file}: {e}") from e
    try:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError as e:  # several text configs (MusicGen's text encoder and decoder): not one decoder LM
        raise UnsupportedModelError(
            f"{type(config).__name__} holds several text models (e.g. a text encoder beside a decoder, as MusicGen): "
            "only decoder language models are supported"
        ) from e
    if text_config is not config and not is_image_text_config(config):
        raise UnsupportedModelError(
            f"{type(config).__name__} is a composite model (its language model is a sub-config, as in Gemma 4's "
            "assistant) and not an image-text-to-text model of transformers; only decoder language models and "
            "image-text-to-text models are supported"
        )
    return config


def resolve_dtype(requested: str, config: PretrainedConfig) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in DTYPES.values() else torch.float32


def load_tokenizer(path: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The folder's tokenizer; a folder without one, or a corrupt tokenizer file, is a clear error."""
    names = {p.name for p in path.iterdir() if p.is_file()}
    if not names & set(TOKENIZER_FILES) and not any(n.endswith(".tiktoken") for n in names):
        raise UnsupportedModelError(
            f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES[:3])}, ...). Download the model's "
            "tokenizer files into the folder, or pass skip_tokenizer_init=True to run on token ids only "
            "(prompt_token_ids in, token ids out, no text)"
        )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json"):
        file = path / name
        if file.is_file():
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise UnsupportedModelError(f"{file} is not valid JSON ({e}); {fetch_again(file)}") from None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, ImportError, KeyError, TypeError) as e:
        raise UnsupportedModelError(
            f"cannot load the tokenizer of {path} ({type(e).__name__}: {str(e)[:300]}). If a tokenizer file is "
            "incomplete, download it again; or pass skip_tokenizer_init=True to run on token ids only"
        ) from e


def eos_ids(path: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    ids: set[int] = set()
    candidates = [getattr(config, "eos_token_id", None), tokenizer.eos_token_id if tokenizer is not None else None]
    try:
        candidates.append(GenerationConfig.from_pretrained(path).eos_token_id)
    except (OSError, ValueError):
        pass
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return ids


def load_model(cfg: EngineConfig, progress: Callable | None = None) -> LoadedModel:
    start = time.perf_counter()
    path = hub.resolve_model(cfg.model, revision=cfg.revision, progress=progress, allow_local=cfg.allow_local_paths)
    hf_config = load_hf_config(path, cfg.trust_remote_code)
    tokenizer = None if cfg.skip_tokenizer_init else load_tokenizer(path, cfg.trust_remote_code)
    device = cfg.torch_device
    dtype = resolve_dtype(cfg.dtype, hf_config)
    impl = select_model_impl(hf_config, cfg.model_impl)
    model = build_model(hf_config, impl, dtype, cfg.trust_remote_code)
    processor = LoadedProcessor(None, "the engine was started with skip_tokenizer_init")
    if is_image_text_config(hf_config) and not cfg.skip_tokenizer_init:  # once the model class was accepted
        processor = load_processor(path, hf_config, cfg.trust_remote_code)
        tokenizer = getattr(processor.processor, "tokenizer", None) or tokenizer
    if impl == "transformers" and cfg.model_impl == "auto":
        conversion = needs_weight_conversion(hf_config)
        model.impl_reason = f"transformers fallback: {conversion}" if conversion else None
        if is_image_text_config(hf_config):
            model.impl_reason = f"transformers fallback: {IMAGE_TEXT_REASON}"
    swapped: list[str] = []
    quant_name = None
    method = _quant_method(cfg.quantization, hf_config)
    target = getattr(model, "hf", model)  # the module whose names match the checkpoint
    on_loaded = None  # quantizes each layer's MoE experts as soon as they have streamed in
    if method is not None:
        from backend.quantization import ExpertsQuantizer, apply_quantization, check_experts_quantization

        method.check_device(device)
        check_experts_quantization(model, method, lambda: checkpoint_keys(path))  # MoE refusals
        swapped = apply_quantization(model, method)
        quant_name = method.name
        experts = ExpertsQuantizer(target, method)
        on_loaded = experts.loaded if experts.sites else None
    regions, needs_converter = None, False
    if impl != "native":
        keys = checkpoint_keys(path)
        if not names_match(target, keys):  # per-expert MoE tensors streamed into stacked experts, if declared so
            regions = streamable(hf_config, target, keys)  # (backend/loading/conversions.py)
            needs_converter = regions is None
    if impl == "native":
        model.load_checkpoint(path, device, dtype, on_loaded)  # native models map (and fuse) checkpoint names
    elif needs_converter:
        # The checkpoint needs transformers' own name conversions (renamed modules, per-expert MoE
        # tensors merged into fused ones...): let transformers' loader (also lazy, per tensor) do it.
        if method is not None and not method.on_the_fly:
            raise QuantizationError(
                f"{cfg.model}: its checkpoint needs transformers' weight conversions, which cannot be combined "
                f"with a {method.name} checkpoint's quantized tensors (they load by name only); model_impl='native' "
                "loads it if the architecture has a native implementation"
            )
        model.load_with_transformers(path, device)  # a fresh full-precision model: quantized once loaded
        if method is not None:
            from backend.quantization import quantize_loaded_linears

            swapped = quantize_loaded_linears(model, method)
    else:
        report = StreamingLoader(target, device, dtype, on_loaded=on_loaded, regions=regions).load(path)
        materialize_leftovers(target, report, device, cfg.model)
        if report.unexpected:
            logger.info("%d checkpoint tensors not used (e.g. %s)", len(report.unexpected), report.unexpected[:3])
    if method is not None:
        from backend.quantization import quantize_experts

        quantize_experts(model, method)  # experts not quantized while streaming (transformers' converter loaded them)
    model.eval()
    cpu_linear, swapped_linears = _swap_cpu_linears(model, cfg.cpu_linear, device, dtype)
    kernels, kernels_reason, kernel_module, kernel_rows = _use_cpu_kernels(
        model, cfg.cpu_kernels, device, dtype, impl == "native"
    )
    if impl == "transformers":
        model.probe_kv_layout(device)  # the KV cache layout from one forward; refuses what the cache cannot hold
        if is_image_text_config(hf_config) and processor.processor is not None:
            model.probe_images(processor.processor, device)  # and with a small image: or image requests are refused
    return LoadedModel(
        path,
        hf_config,
        tokenizer,
        model,
        impl,
        dtype,
        device,
        eos_ids(path, hf_config, tokenizer),
        quant_name,
        swapped,
        time.perf_counter() - start,
        cpu_linear,
        swapped_linears,
        processor if is_image_text_config(hf_config) else None,
        kernels,
        kernels_reason,
        cpu_kernel_module=kernel_module,
        cpu_kernel_rows=kernel_rows,
    )


def choose_cpu_linear(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """ "packed", "upcast" or "none" for a model of `dtype` on `device` (EngineConfig.cpu_linear)."""
    if device.type != "cpu" or dtype == torch.float32 or requested == "none":
        return "none"
    if requested == "auto":
        if not cpu_has_fast_half_matmul():
            return "upcast"
        if packing_available(dtype):
            return "packed"
        # oneDNN packs bf16 here but not this dtype (fp16 without AVX512-FP16), whose matmul is slow as well
        return "upcast" if packing_available(torch.bfloat16) else "none"
    if requested == "packed" and not packing_available(dtype):
        raise EngineError(
            f"cpu_linear='packed' needs oneDNN linear prepacking for {str(dtype).removeprefix('torch.')}"
            ", which this torch build or CPU lacks (fp16 needs AVX512-FP16); use 'auto' or 'upcast'"
        )
    return requested


def choose_cpu_kernels(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(whether our C++ CPU kernels run, which ones or why not) for a model of `dtype` on `device`
    (EngineConfig.cpu_kernels). Builds them on first use; never raises: a failed build means the torch path."""
    from flab_kernels.cpu.build import cpu_kernels

    if requested == "torch":
        return False, "cpu_kernels='torch'"
    if device.type != "cpu":
        return False, f"the model runs on {device.type}"
    if dtype not in (torch.bfloat16, torch.float32):
        return False, f"the C++ CPU kernels run bfloat16 and float32 models, not {str(dtype).removeprefix('torch.')}"
    if requested == "auto" and dtype == torch.float32:
        return False, "float32 models stay on torch under 'auto' (bit for bit transformers); 'fused' runs them"
    kernels = cpu_kernels(paths.cache_dir())
    if not kernels.available:
        logger.warning("cpu_kernels=%r: %s; running the torch path", requested, kernels.reason)
        return False, kernels.reason
    return True, kernels.reason


def _use_cpu_kernels(
    model: nn.Module, requested: str, device: torch.device, dtype: torch.dtype, native: bool
) -> tuple[str, str, ModuleType | None, int]:
    """("fused" | "torch", reason, the loaded kernel module or None, the linears' row limit): the model's modules
    swapped for our kernels where they run; the module also goes to the torch attention backend (its decode-only
    steps, both implementations)."""
    from flab_kernels.cpu.build import cpu_kernels

    use, reason = choose_cpu_kernels(requested, device, dtype)
    if not use:
        return "torch", reason, None, 0
    ext = cpu_kernels(paths.cache_dir()).module
    used = use_cpu_kernels(model, ext, native)
    rows = f"; linears ours up to {used.max_rows} rows" if used.max_rows else ""
    stack = "; decode steps through every layer in one C++ call" if used.stacked else ""
    return "fused", f"{reason}: {used.modules} modules{rows}{stack}", ext, used.max_rows


def _swap_cpu_linears(model: nn.Module, requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, int]:
    kind = choose_cpu_linear(requested, device, dtype)
    if kind == "packed":
        count = pack_linears(model, half_linears(model))
        fuse_siblings(model)  # a transformers model's q/k/v and gate/up: one product each (native ones are fused)
        for m in model.modules():  # native MoE experts (stacked parameters, not nn.Linear)
            if isinstance(m, Experts):
                m.pack()
        pack_hf_experts(model)  # a transformers model's experts, through transformers' ExpertsInterface
        return kind, count
    if kind == "upcast":
        # skipped copies (short memory) still leave the attention math in fp32 on such a CPU
        return kind, _upcast_linears_if_memory_allows(model, forced=requested == "upcast")
    return "none", 0


def _upcast_linears_if_memory_allows(model: nn.Module, forced: bool) -> int:
    """fp32 copies of the 16-bit linear weights (2x their bytes) unless they would take over half the available
    memory (then the 16-bit weights are used for every product; `cpu_linear="upcast"` insists)."""
    linears = half_linears(model)
    half_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    available = psutil.virtual_memory().available
    if not forced and 2 * half_bytes > available // 2:
        logger.warning(
            "not making fp32 copies of the linear weights (%s) with %s available: many-token "
            "steps will use the slower 16-bit matmul",
            format_bytes(2 * half_bytes),
            format_bytes(available),
        )
        return 0
    return upcast_linears(linears)


def _quant_method(requested: str | None, hf_config: PretrainedConfig):
    has_checkpoint_quant = getattr(hf_config, "quantization_config", None) is not None
    if requested is None and not has_checkpoint_quant:
        return None
    try:
        from backend.quantization import resolve_quantization
    except ImportError as e:  # pragma: no cover - the package ships with the project
        raise QuantizationError(f"quantization is not available: {e}") from e
    try:
        return resolve_quantization(requested, hf_config)
    except EngineError:
        raise
    except Exception as e:
        raise QuantizationError(f"cannot set up quantization {requested!r}: {e}") from e
